//! *Edge*: I/O implementations outside the core that are not the network transport.
//!
//! - `records`: the decision records on disk (hash-chained JSONL segments, group commit,
//!   rotation, retention, recovery) and `mistguard records verify|query`.
//! - `moderation`: the client of Mistral's moderation API (keys, retries, breaker, limits, cache,
//!   batching, budgets).

pub mod moderation;
pub mod records;
