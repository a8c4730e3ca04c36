//! *Edge*: the client of Mistral's moderation API (issue 19). The core part (request bodies,
//! parsing, the category table) is [`crate::moderation`]; this module does the I/O around it.
//!
//! - [`Moderator::moderate`]: cache (a keyed BLAKE3 hash of model and text) → budgets (total and
//!   per subject, estimated tokens per hour) → the batcher, which gathers texts for up to
//!   `batch_window` into one `POST /v1/moderations`, and gives each caller its own result.
//! - [`Moderator::send`]: one direct call (`mistguard moderate`).
//! - Every API call: keys (round-robin, 401/403 benched), client-side limits per minute, retries
//!   (429, 5xx, network errors, timeouts; backoff with jitter, `Retry-After`, a retry budget), the
//!   circuit breaker, all within `call_timeout`.
//!
//! Keys are never in a log line, an error, a metric or a panic; texts and response bodies are
//! never in a log line or an error either.

use crate::moderation::ModerationResult;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod breaker;
mod client;
mod keys;
mod retry;

pub use client::{estimated_tokens, Moderator};

/// The client's metrics (the daemon registers them at zero and documents them): name, help.
pub const METRICS: &[(&str, &str)] = &[
    (
        "mistguard_moderation_requests_total",
        "HTTP requests to the moderation API, by endpoint (moderations, chat) and status (the HTTP code, or error)",
    ),
    (
        "mistguard_moderation_request_seconds",
        "Duration of one HTTP attempt to the moderation API, by endpoint",
    ),
    (
        "mistguard_moderation_errors_total",
        "Moderation calls that gave no answer, by kind",
    ),
    (
        "mistguard_moderation_retries_total",
        "Retries of moderation calls, by outcome (done, refused by the retry budget)",
    ),
    (
        "mistguard_moderation_breaker_state",
        "The moderation circuit breaker's state: 0 closed, 1 open, 2 half-open",
    ),
    (
        "mistguard_moderation_breaker_transitions_total",
        "Moderation circuit breaker transitions, by the state entered",
    ),
    (
        "mistguard_moderation_cache_hits_total",
        "Moderation answers served from the cache",
    ),
    (
        "mistguard_moderation_cache_misses_total",
        "Moderation cache lookups that missed",
    ),
    (
        "mistguard_moderation_batch_size",
        "Texts per moderation API call",
    ),
    (
        "mistguard_moderation_batch_limit",
        "The current batch size (halved when the API refuses a batch with 400/413, doubled again after 64 answered batches in a row)",
    ),
    (
        "mistguard_moderation_tokens_total",
        "Estimated tokens (bytes / 4) sent to the moderation API: the spend",
    ),
    (
        "mistguard_moderation_budget_tokens",
        "The configured hourly moderation budgets in estimated tokens, by scope (total, subject; 0: none)",
    ),
    (
        "mistguard_moderation_budget_refused_total",
        "Texts not moderated because a budget was spent, by scope",
    ),
    (
        "mistguard_moderation_keys",
        "Moderation API keys, by state (usable, benched after a 401/403)",
    ),
    (
        "mistguard_moderation_auth_outage",
        "1 while every moderation API key is refused (401/403), else 0",
    ),
];

/// Where API keys come from. All sources are used together, de-duplicated, in this order.
#[derive(Clone, Default)]
pub struct KeySource {
    /// `MISTRAL_API_KEY` (one key), as read from the environment by the caller.
    pub single: Option<String>,
    /// `MISTRAL_API_KEYS` (comma-separated).
    pub list: Option<String>,
    /// A mounted file, one key per line (`#` comments and blank lines ignored), re-read when it
    /// changes (the client's background task looks at it every second). A file that disappears
    /// or cannot be read keeps the keys read last.
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

impl KeySource {
    /// The distinct keys the sources hold now (the file read once), for a start-up summary.
    pub fn count(&self) -> usize {
        keys::Keys::new(self, Duration::from_secs(1)).counts().1
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
    /// Texts per API call (halved, down to 1, when a batch is refused with 400 or 413; doubled
    /// again, up to this, after 64 batches in a row are answered).
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
    /// The first retry's backoff (then ×1.5 per retry, capped at 60 s, with jitter); 500 ms by
    /// default (tests shorten it).
    pub backoff_base: Duration,
}

impl Default for ClientConfig {
    /// `https://api.mistral.ai`, `mistral-moderation-latest`, no key; 2 s per attempt, 5 s per
    /// call, 2 retries within a 10% retry budget; batches of 16 within 5 ms; no client-side
    /// limits or budgets; 10 000 answers cached for an hour; the breaker opens after 5 failed
    /// calls for 30 s; a refused key is benched for 5 minutes.
    fn default() -> ClientConfig {
        ClientConfig {
            url: "https://api.mistral.ai".into(),
            model: "mistral-moderation-latest".into(),
            keys: KeySource::default(),
            attempt_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(5),
            retries: 2,
            retry_budget: 0.1,
            batch_size: 16,
            batch_window: Duration::from_millis(5),
            requests_per_minute: 0,
            tokens_per_minute: 0,
            budget_tokens_per_hour: 0,
            subject_budget_tokens_per_hour: 0,
            cache_entries: 10_000,
            cache_ttl: Duration::from_secs(3600),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            key_cooldown: Duration::from_secs(300),
            backoff_base: Duration::from_millis(500),
        }
    }
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
