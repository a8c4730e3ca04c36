//! Decision records that lose nothing and leak nothing: append-only, hash-chained JSONL.
//!
//! A [`Sink`] writes one *stream* of records (the daemon's are `decisions`, `reports` for
//! RULE-MIST-005 hits, and the opt-in `samples`) into a directory as segments named
//! `<stream>-<seq:010>.jsonl`.
//!
//! # Invariants
//!
//! * **Line format.** Every line is byte for byte `{"hash":"<64 hex>",` followed by R and `\n`,
//!   where R is `"prev":"<64 hex>",` followed by the record's serialized JSON object without its
//!   opening `{` (so R ends with `}` and the line is one JSON object). `hash = BLAKE3(R)`.
//! * **Chain.** `prev` is the hash of the line before it; the first record of a stream has 64
//!   zeros. A new segment's first line carries the last hash of the segment before, so the chain
//!   spans segments. Editing, deleting, inserting or moving a line breaks it ([`verify`] names
//!   the first broken record). The hash is not keyed: the chain shows tampering and loss, it
//!   does not stop someone who rewrites the whole tail.
//! * **Rotation and retention.** A new segment starts when the current one reaches
//!   `max_segment_bytes`. Whole oldest segments (never the current one) are deleted when their
//!   last modification is older than `retain_age` or while the stream exceeds
//!   `max_total_bytes`, at open and at each rotation. The oldest remaining segment's first `prev`
//!   is then the anchor; a gap in `seq` is broken.
//! * **Durability.** [`Durability::Sync`]: [`Sink::write`] returns once the record is written
//!   and fdatasync'ed; the writer thread takes one job, drains every job already queued (up to
//!   4096, and no further than the end of the segment), writes them with one `write` and one
//!   fsync (group commit) and then answers them all; a full queue makes callers wait.
//!   [`Durability::Async`]: `write` returns once the record is queued; a full queue drops it
//!   (`mistguard_records_dropped_total`), and the writer fsyncs at most every
//!   `async_fsync_interval`. [`Sink::flush`] resolves when everything queued before it is on
//!   disk; the last handle dropped makes the writer write, fsync and end.
//! * **Errors never crash.** A failed write or fsync is counted
//!   (`mistguard_records_errors_total`, one WARN a second at most), the batch's callers get
//!   [`RecordError::Io`], and the file is cut back to the end of its last good line before the
//!   next batch, so no half line remains and the chain goes on from the last hash that was
//!   written. Later batches are tried again (the disk may free up).
//! * **Recovery.** [`Sink::open`] reads only the last segment: a final part without `\n`, and
//!   final lines that do not parse or whose hash does not verify, are cut off (one WARN with the
//!   number of bytes) and the chain continues from the last good line.
//! * **What records never hold.** A [`DecisionRecord`] holds no text, no key and no raw subject:
//!   the subject is a keyed hash (`subject_hash`), the text only its length and keyed hash.
//!   Only [`SampleRecord`]s (RULE-MIST-007 retraining samples) hold text, and they go only to
//!   their own opt-in `samples` stream.
//!
//! Serialization happens in the caller; the writer thread (`mistguard-records-<stream>`) only
//! chains, writes and syncs. Metrics: `mistguard_records_written_total`,
//! `mistguard_records_dropped_total`, `mistguard_records_errors_total` and the histogram
//! `mistguard_records_fsync_seconds`, all labelled `stream`.

mod chain;
pub mod cli;
mod read;
mod sink;
#[cfg(test)]
mod tests;
pub mod time;

pub use read::{csv_field, query, verify, Broken, Filter, Format, VerifyReport, CSV_HEADER};
pub use sink::{Durability, RecordError, Sink, SinkConfig, SinkStats};

use serde::{Deserialize, Serialize};

/// One rule hit of a decision (no text: the trigger's id and the byte span).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecordHit {
    pub rule: String,
    pub trigger: String,
    pub score: f32,
    pub start: u64,
    pub end: u64,
}

/// One decision of the daemon. Holds no text, no keys and no raw subject.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecisionRecord {
    /// The decision id (32 hex).
    pub id: String,
    pub time_unix_ms: u64,
    /// `classify`, `classify_stream` or `authorize_tool_call`.
    pub rpc: String,
    pub direction: String,
    /// The keyed subject hash (32 hex), or "" when the call had no subject.
    pub subject_hash: String,
    pub request_id: String,
    /// "" when undecided.
    pub language: String,
    pub hits: Vec<RecordHit>,
    /// e.g. `block`.
    pub action: String,
    /// The escalation level.
    pub level: u32,
    pub reason: String,
    /// "" when none.
    pub ruleset_version: String,
    /// "" when none.
    pub policy_version: String,
    /// The remote moderation model that answered (`mistral-moderation-2411`); absent when none
    /// did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub moderation_model: String,
    pub text_bytes: u64,
    /// Hex keyed BLAKE3 of the text (computed by the caller).
    pub text_hash: String,
    pub latency_us: u64,
}

/// A RULE-MIST-007 retraining sample: this one holds text, and goes only to the opt-in
/// `samples` stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SampleRecord {
    pub id: String,
    pub time_unix_ms: u64,
    pub decision_id: String,
    pub rules: Vec<String>,
    pub language: String,
    pub text: String,
}
