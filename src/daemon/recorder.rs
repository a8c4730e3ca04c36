//! The daemon's side of the decision records (`records.dir`): builds each call's
//! [`DecisionRecord`] from what the service decided and writes it to the sinks of
//! [`crate::io::records`]:
//! - `decisions`: every decision (Classify, each ClassifyStream, AuthorizeToolCall);
//! - `reports`: the same record again when RULE-MIST-005 fired, kept for `records.reports_retain`;
//! - `samples`: RULE-MIST-007 retraining samples WITH their text, only with `records.samples = on`;
//! - `novel`: texts remote moderation flagged and the local rules passed, WITH their text, for
//!   rule writers, only with `records.novel_samples = on`.
//!
//! A record holds the subject's keyed hash, never the subject; a keyed hash of the text, never
//! the text (but for the opt-in samples); no key.

use super::config::RecordsConfig;
use super::service::Record;
use crate::io::records::{
    DecisionRecord, Durability, RecordError, RecordHit, SampleRecord, Sink, SinkConfig,
};
use std::time::Duration;

pub struct Recorder {
    decisions: Sink,
    reports: Sink,
    samples: Option<Sink>,
    novel: Option<Sink>,
    /// `sync` with `records.on_error = fail_closed`: a record that cannot be written fails the
    /// call.
    fail_closed: bool,
    text_key: [u8; 32],
}

impl Recorder {
    /// Opens the sinks (recovering a torn last line of each).
    ///
    /// # Errors
    /// One line naming the directory and the OS error.
    pub fn open(
        cfg: &RecordsConfig,
        dir: &std::path::Path,
        text_key: [u8; 32],
    ) -> Result<Recorder, String> {
        let base = |retain: Duration| SinkConfig {
            durability: if cfg.sync {
                Durability::Sync
            } else {
                Durability::Async
            },
            queue: cfg.queue,
            max_segment_bytes: cfg.segment_bytes,
            max_total_bytes: cfg.max_bytes,
            retain_age: retain,
            linger: cfg.commit_delay,
            ..SinkConfig::default()
        };
        std::fs::create_dir_all(dir).map_err(|e| format!("records.dir {}: {e}", dir.display()))?;
        Ok(Recorder {
            decisions: Sink::open(dir, "decisions", base(cfg.retain))?,
            reports: Sink::open(dir, "reports", base(cfg.reports_retain))?,
            samples: if cfg.samples {
                Some(Sink::open(dir, "samples", base(cfg.samples_retain))?)
            } else {
                None
            },
            novel: if cfg.novel_samples {
                Some(Sink::open(dir, "novel", base(cfg.samples_retain))?)
            } else {
                None
            },
            fail_closed: cfg.sync && cfg.fail_closed,
            text_key,
        })
    }

    pub fn keeps_samples(&self) -> bool {
        self.samples.is_some()
    }

    /// The keyed hash of a text, as records show it (64 hex digits).
    pub fn text_hash(&self, text: &[u8]) -> String {
        blake3::keyed_hash(&self.text_key, text)
            .to_hex()
            .to_string()
    }

    /// The same, fed chunk by chunk (a stream).
    pub fn text_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.text_key)
    }

    /// Writes one decision (and its report and sample where they apply). `Err` only when the
    /// call must fail: the decision record could not be written and the mode is fail-closed.
    pub(super) async fn write(&self, r: &Record<'_>, sample: Option<&str>) -> Result<(), ()> {
        let time_unix_ms = super::state::now_ms();
        let rec = DecisionRecord {
            id: r.decision_id.to_string(),
            time_unix_ms,
            rpc: r.rpc.to_string(),
            direction: r.direction.to_string(),
            subject_hash: r.subject.map(|s| s.hex()).unwrap_or_default(),
            request_id: r.request_id.to_string(),
            language: r.language.unwrap_or("").to_string(),
            hits: r
                .hits
                .iter()
                .map(|h| RecordHit {
                    rule: h.rule_id.to_string(),
                    trigger: h.trigger_id.to_string(),
                    score: h.score,
                    start: h.start,
                    end: h.end,
                })
                .collect(),
            action: r.action.to_string(),
            level: r.level,
            reason: r.reason.to_string(),
            ruleset_version: r.ruleset_version.to_string(),
            policy_version: r.policy_version.to_string(),
            moderation_model: r.moderation_model.to_string(),
            text_bytes: r.bytes,
            text_hash: r.text_hash.clone(),
            latency_us: r.started.elapsed().as_micros() as u64,
        };
        let report = r.rules.contains(&"RULE-MIST-005");
        let (main, rep) = if report {
            let (a, b) = tokio::join!(self.decisions.write(&rec), self.reports.write(&rec));
            (a, Some(b))
        } else {
            (self.decisions.write(&rec).await, None)
        };
        if let (Some(sink), Some(text)) = (&self.samples, sample) {
            let s = SampleRecord {
                id: r.decision_id.to_string(),
                time_unix_ms,
                decision_id: r.decision_id.to_string(),
                rules: r.rules.iter().map(|x| x.to_string()).collect(),
                language: r.language.unwrap_or("").to_string(),
                text: text.to_string(),
            };
            // A lost sample is counted by its sink; it never fails the call.
            let _ = sink.write(&s).await;
        }
        // Dropped (async mode, full queue) is counted by the sink and never fails a call; any
        // other error (I/O, a writer that is gone, a record that does not encode) does in
        // fail-closed mode.
        let failed = |res: &Result<(), RecordError>| matches!(res, Err(e) if !matches!(e, RecordError::Dropped));
        if self.fail_closed && (failed(&main) || rep.as_ref().is_some_and(failed)) {
            return Err(());
        }
        Ok(())
    }

    /// Keeps a novel-attack sample (opt-in, `records.novel_samples`): the decision's rules (remote
    /// ones included) and the text. A lost sample is counted by its sink; it never fails a call.
    pub(super) async fn write_novel(
        &self,
        decision_id: &str,
        rules: &[&str],
        language: Option<&str>,
        text: &str,
    ) {
        if let Some(sink) = &self.novel {
            let s = SampleRecord {
                id: decision_id.to_string(),
                time_unix_ms: super::state::now_ms(),
                decision_id: decision_id.to_string(),
                rules: rules.iter().map(|x| x.to_string()).collect(),
                language: language.unwrap_or("").to_string(),
                text: text.to_string(),
            };
            let _ = sink.write(&s).await;
        }
    }

    /// Resolves once every record queued so far is on disk (shutdown).
    pub async fn flush(&self) {
        // A loss is counted and logged by its sink already.
        let _ = self.decisions.flush().await;
        let _ = self.reports.flush().await;
        for s in [&self.samples, &self.novel].into_iter().flatten() {
            let _ = s.flush().await;
        }
    }
}
