//! The `memory` backend of [`SubjectStore`]: the in-memory escalation matrix
//! (`daemon::escalation`, bounded and expiring), plus, with a data directory, the review queue
//! on disk (`disk`), so suspensions and the queue survive a restart. It never fails.

use super::disk::Disk;
use super::{
    EscalationParams, RecordOutcome, ReviewEntry, StateError, SubjectGate, SubjectStore, Violation,
};
use crate::action::Action;
use crate::daemon::config::EscalationConfig;
use crate::daemon::escalation::Escalation;
use crate::daemon::ids::SubjectKey;
use std::sync::Arc;

pub struct LocalStore {
    pub esc: Escalation,
    disk: Option<Arc<Disk>>,
}

impl LocalStore {
    /// The matrix, and with `data_dir` its file (the suspensions it holds are restored).
    ///
    /// # Errors
    /// A state file that does not open (one line naming it).
    pub fn open(
        cfg: EscalationConfig,
        data_dir: Option<&std::path::Path>,
        now_ms: u64,
    ) -> Result<LocalStore, String> {
        let esc = Escalation::new(cfg);
        let disk = match data_dir {
            Some(d) => Some(Arc::new(Disk::open(&d.join(super::disk::STATE_FILE))?)),
            None => None,
        };
        if let Some(d) = &disk {
            let entries = d.load(now_ms)?;
            if !entries.is_empty() {
                tracing::info!(
                    target: "mistguard::escalation",
                    suspended = entries.len(),
                    "suspensions restored from the data directory"
                );
            }
            for e in entries {
                esc.add_review(e);
            }
        }
        Ok(LocalStore { esc, disk })
    }

    /// Runs a change of the file on the blocking pool (rare: a suspension or a lift). A failure
    /// is counted and logged; the memory state holds anyway.
    async fn on_disk(&self, f: impl FnOnce(&Disk) -> Result<(), String> + Send + 'static) {
        let Some(d) = self.disk.clone() else { return };
        let res = tokio::task::spawn_blocking(move || f(&d))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(err) = res {
            metrics::counter!("mistguard_state_errors_total", "op" => "persist").increment(1);
            tracing::error!(target: "mistguard::state", error = %err, "could not keep a suspension on disk");
        }
    }

    /// Takes the state Redis reports (see `Escalation::follow`); a suspension lifted elsewhere
    /// also leaves the file.
    pub async fn follow(&self, subject: &SubjectKey, g: &SubjectGate, now_ms: u64) {
        if self.esc.follow(subject, g, now_ms) {
            let s = subject.hex();
            self.on_disk(move |d| d.remove(&s)).await;
        }
    }

    fn key(subject: &str) -> Result<SubjectKey, StateError> {
        SubjectKey::from_hex(subject)
            .ok_or_else(|| StateError::Unavailable("not a subject hash".into()))
    }
}

#[tonic::async_trait]
impl SubjectStore for LocalStore {
    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }

    async fn check(&self, subject: &str, now_ms: u64) -> Result<SubjectGate, StateError> {
        Ok(self.esc.state(&Self::key(subject)?, now_ms))
    }

    async fn record(
        &self,
        _p: &EscalationParams,
        v: &Violation<'_>,
    ) -> Result<RecordOutcome, StateError> {
        let action = if v.severe {
            Action::Block
        } else {
            Action::Flag
        };
        let (outcome, entry) = self.esc.record(
            &Self::key(v.subject)?,
            v.decision_id,
            action,
            v.rules,
            v.now_ms,
        );
        if let Some(e) = entry {
            self.on_disk(move |d| d.put(&e)).await;
        }
        Ok(outcome)
    }

    async fn merge_suspension(
        &self,
        _p: &EscalationParams,
        entry: &ReviewEntry,
        _now_ms: u64,
    ) -> Result<(), StateError> {
        self.esc.add_review(entry.clone());
        let e = entry.clone();
        self.on_disk(move |d| d.put(&e)).await;
        Ok(())
    }

    async fn merge_rate_limit(
        &self,
        subject: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<(), StateError> {
        self.esc.mirror(
            &Self::key(subject)?,
            &SubjectGate {
                rate_limited_until_ms: Some(until_ms),
                ..SubjectGate::default()
            },
            now_ms,
        );
        Ok(())
    }

    async fn reviews(&self, limit: usize, now_ms: u64) -> Result<Vec<ReviewEntry>, StateError> {
        Ok(self.esc.reviews(limit, now_ms))
    }

    async fn lift(&self, subject: &str, now_ms: u64) -> Result<bool, StateError> {
        let lifted = self.esc.lift(subject, now_ms);
        let s = subject.to_string();
        self.on_disk(move |d| d.remove(&s)).await;
        Ok(lifted)
    }
}
