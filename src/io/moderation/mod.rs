//! *Edge*: the client of Mistral's moderation API (issue 19). The core part (request bodies,
//! parsing, the category table) is [`crate::moderation`]; this module does the I/O around it.
//!
//! INTERFACE SKELETON: the types and signatures below are the contract between the daemon and
//! the client; the bodies are being written.

use crate::moderation::{ModerationResponse, ModerationResult};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where API keys come from. All sources are used together, de-duplicated, in this order.
#[derive(Clone, Default)]
pub struct KeySource {
    /// `MISTRAL_API_KEY` (one key), as read from the environment by the caller.
    pub single: Option<String>,
    /// `MISTRAL_API_KEYS` (comma-separated).
    pub list: Option<String>,
    /// A mounted file, one key per line (`#` comments and blank lines ignored), re-read when it
    /// changes (checked at most once per second).
    pub file: Option<PathBuf>,
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySource")
            .field("single", &self.single.as_ref().map(|_| "***"))
            .field("list", &self.list.as_ref().map(|_| "***"))
            .field("file", &self.file)
            .finish()
    }
}

/// The client's settings (the daemon fills them from `moderation.*`).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Base URL, `https://api.mistral.ai` by default (no trailing `/v1`).
    pub url: String,
    pub model: String,
    pub keys: KeySource,
    /// One HTTP attempt's timeout.
    pub attempt_timeout: Duration,
    /// The longest one call may take, retries and Retry-After waits included.
    pub call_timeout: Duration,
    /// Retries of one call (429, 5xx, network errors, timeouts).
    pub retries: u32,
    /// Retries may be at most this fraction of calls (plus a floor of 10 per minute).
    pub retry_budget: f64,
    /// Texts per API call (halved, down to 1, when a batch is refused with 400 or 413).
    pub batch_size: usize,
    /// How long the batcher waits for more texts after the first.
    pub batch_window: Duration,
    /// Client-side limits, under the organisation's; 0: none.
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    /// Spending caps, in estimated tokens (bytes / 4, rounded up) per hour; 0: none.
    pub budget_tokens_per_hour: u64,
    pub subject_budget_tokens_per_hour: u64,
    /// Answers kept (0: no cache) and for how long.
    pub cache_entries: usize,
    pub cache_ttl: Duration,
    /// Consecutive failures that open the breaker, and how long it stays open before a probe.
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    /// How long a key answered 401/403 stays out of the rotation.
    pub key_cooldown: Duration,
}

/// A moderated text's answer.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The model that answered (the response's `model`).
    pub model: Arc<str>,
    pub result: ModerationResult,
    /// Served from the cache (no request made).
    pub cached: bool,
}

/// Why a call gave no answer. Label values of `mistguard_moderation_errors_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The call's time ran out.
    Timeout,
    /// Connect error, reset, TLS error.
    Network,
    /// 429 (or waiting out a Retry-After).
    RateLimited,
    /// 5xx.
    Server,
    /// Every key refused (401/403): an auth outage.
    Auth,
    /// 400/413/422 and other 4xx: the API refused the request.
    Rejected,
    /// 200 with a body that does not parse, or the wrong number of results.
    Malformed,
    /// The circuit breaker is open.
    BreakerOpen,
    /// Over the total or the subject's hourly budget.
    Budget,
    /// Over the client-side requests or tokens per minute.
    ClientLimit,
    /// No key configured.
    NoKeys,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::Network => "network",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::Server => "server",
            FailureKind::Auth => "auth",
            FailureKind::Rejected => "rejected",
            FailureKind::Malformed => "malformed",
            FailureKind::BreakerOpen => "breaker_open",
            FailureKind::Budget => "budget",
            FailureKind::ClientLimit => "client_limit",
            FailureKind::NoKeys => "no_keys",
        }
    }
}

/// A failed call: its kind and a detail that never holds a key or a text.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "moderation {}: {}", self.kind.as_str(), self.detail)
    }
}

impl std::error::Error for Failure {}

/// The circuit breaker's state (`mistguard_moderation_breaker_state`: 0, 1, 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

/// One direct request (for `mistguard moderate`): no cache, no batching, no budget.
#[derive(Clone, Debug)]
pub enum Request {
    /// `POST /v1/moderations`.
    Texts(Vec<String>),
    /// `POST /v1/chat/moderations`: conversations of (role, content).
    Chat(Vec<Vec<(String, String)>>),
}
