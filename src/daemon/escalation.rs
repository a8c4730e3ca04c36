//! The escalation matrix (SPEC "The escalation matrix"), in memory: bounded, expiring state per
//! subject hash. With Redis (`state::redis`) the same matrix is kept there, exactly across
//! replicas, and this one counts only while Redis is unreachable; it also mirrors every
//! suspension Redis reports, so an outage never lifts one.
//!
//! - Level 1: any hit.
//! - Level 2: `level2_hits` decisions of BLOCK or above within `level2_window` (RULE-MIST-005 on
//!   its first hit): the subject is suspended for `suspension`; its requests are answered BLOCK
//!   with the reason `suspended`, and it enters the review queue with the rules, counts and
//!   decision ids that put it there.
//! - Level 3: `level3_subjects` distinct subjects reaching level 2 within `level3_window` raise an
//!   alert (a metric and a log line), once per window.
//!
//! A RULE-MIST-010 hit rate-limits the subject for `rate_limit`: its requests are answered
//! RATE_LIMIT with the reason `rate_limited`.
//!
//! Times are milliseconds since the Unix epoch, given by the caller (suspensions are persisted
//! and shared, so they cannot be `Instant`s).
//!
//! The map holds at most `max_subjects` entries. When full, expired entries are swept; if it is
//! still full, a new subject is not tracked (and counted in a metric) rather than evicting one
//! that may be suspended.

use super::config::EscalationConfig;
use super::ids::SubjectKey;
use super::state::{RecordOutcome, ReviewEntry, SubjectGate};
use crate::action::Action;
use dashmap::DashMap;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

/// What a subject's state says before its text is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Open { level: u32 },
    Suspended,
    RateLimited { level: u32, until_ms: u64 },
}

impl Gate {
    /// The gate a [`SubjectGate`] (local, Redis, or both merged) says.
    pub fn from_state(g: &SubjectGate) -> Gate {
        if g.suspended_until_ms.is_some() {
            return Gate::Suspended;
        }
        let level = u32::from(g.any_hit);
        match g.rate_limited_until_ms {
            Some(until_ms) => Gate::RateLimited { level, until_ms },
            None => Gate::Open { level },
        }
    }
}

/// Most hit decisions kept per subject for the review entry's rule counts.
const MAX_HITS_KEPT: usize = 64;

#[derive(Debug)]
struct SubjectState {
    /// Times and decision ids of recent decisions of BLOCK or above (at most `level2_hits`).
    severe: VecDeque<(u64, String)>,
    /// Times and rules of recent decisions with hits (at most [`MAX_HITS_KEPT`]).
    hits: VecDeque<(u64, Box<[Box<str>]>)>,
    last_hit_ms: Option<u64>,
    suspended_until: Option<u64>,
    rate_limited_until: Option<u64>,
    last_seen: u64,
}

impl SubjectState {
    fn new(now: u64) -> SubjectState {
        SubjectState {
            severe: VecDeque::new(),
            hits: VecDeque::new(),
            last_hit_ms: None,
            suspended_until: None,
            rate_limited_until: None,
            last_seen: now,
        }
    }
}

pub struct Escalation {
    cfg: EscalationConfig,
    subjects: DashMap<SubjectKey, SubjectState>,
    /// Subjects that reached level 2, newest last, within `level3_window`.
    level2_recent: Mutex<Level3Window>,
    /// The review queue: suspended subjects by hash (32 hex digits).
    reviews: Mutex<BTreeMap<String, ReviewEntry>>,
    /// The recent level-3 alerts of this daemon (the review console shows them).
    pub alerts: Alerts,
}

#[derive(Default)]
struct Level3Window {
    entries: VecDeque<(u64, SubjectKey)>,
    alerted_at: Option<u64>,
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Escalation {
    pub fn new(cfg: EscalationConfig) -> Escalation {
        Escalation {
            cfg,
            subjects: DashMap::new(),
            level2_recent: Mutex::new(Level3Window::default()),
            reviews: Mutex::new(BTreeMap::new()),
            alerts: Alerts::default(),
        }
    }

    pub fn tracked(&self) -> usize {
        self.subjects.len()
    }

    /// The subject's state before classifying its text.
    pub fn state(&self, subject: &SubjectKey, now: u64) -> SubjectGate {
        let Some(s) = self.subjects.get(subject) else {
            return SubjectGate::default();
        };
        SubjectGate {
            suspended_until_ms: s.suspended_until.filter(|t| *t > now),
            rate_limited_until_ms: s.rate_limited_until.filter(|t| *t > now),
            any_hit: s
                .last_hit_ms
                .is_some_and(|t| now.saturating_sub(t) <= ms(self.cfg.level2_window)),
        }
    }

    /// The subject's gate before classifying its text.
    pub fn check(&self, subject: &SubjectKey, now: u64) -> Gate {
        Gate::from_state(&self.state(subject, now))
    }

    /// Takes a state Redis (or the store on disk) reports: suspensions and rate limits only
    /// lengthen, a hit marks level 1. Nothing here lowers a level.
    pub fn mirror(&self, subject: &SubjectKey, g: &SubjectGate, now: u64) {
        if g.suspended_until_ms.is_none() && g.rate_limited_until_ms.is_none() && !g.any_hit {
            return;
        }
        if !self.room_for(subject, now) {
            return;
        }
        let mut s = self
            .subjects
            .entry(*subject)
            .or_insert_with(|| SubjectState::new(now));
        s.last_seen = now;
        if g.any_hit {
            s.last_hit_ms = Some(s.last_hit_ms.unwrap_or(0).max(now));
        }
        if let Some(t) = g.suspended_until_ms {
            s.suspended_until = Some(s.suspended_until.unwrap_or(0).max(t));
        }
        if let Some(t) = g.rate_limited_until_ms {
            s.rate_limited_until = Some(s.rate_limited_until.unwrap_or(0).max(t));
        }
    }

    /// Takes the state Redis holds for the subject as its own (Redis answered, so it is the
    /// truth): suspensions and rate limits follow it both ways, so a lift on another replica
    /// lifts here too. Nothing is stored for a subject without state on either side.
    /// Returns whether it lifted a suspension this replica held.
    pub fn follow(&self, subject: &SubjectKey, g: &SubjectGate, now: u64) -> bool {
        if let Some(mut s) = self.subjects.get_mut(subject) {
            let lifted = s.suspended_until.is_some() && g.suspended_until_ms.is_none();
            s.suspended_until = g.suspended_until_ms;
            s.rate_limited_until = g.rate_limited_until_ms;
            if g.any_hit {
                s.last_hit_ms = Some(now);
            }
            s.last_seen = now;
            drop(s);
            if lifted {
                self.reviews_lock().remove(&subject.hex());
            }
            return lifted;
        }
        if g.any_hit || g.suspended_until_ms.is_some() || g.rate_limited_until_ms.is_some() {
            self.mirror(subject, g, now);
        }
        false
    }

    /// Whether the map may hold `subject` (it does already, or there is room after a sweep).
    fn room_for(&self, subject: &SubjectKey, now: u64) -> bool {
        if self.subjects.contains_key(subject) || self.subjects.len() < self.cfg.max_subjects {
            return true;
        }
        self.sweep(now);
        if self.subjects.len() < self.cfg.max_subjects {
            return true;
        }
        metrics::counter!("mistguard_escalation_untracked_total").increment(1);
        false
    }

    /// Records a decision about the subject's text: its action and the rules that fired. Returns
    /// the outcome, and the review entry when this decision suspended the subject.
    pub fn record(
        &self,
        subject: &SubjectKey,
        decision_id: &str,
        action: Action,
        rules: &[&str],
        now: u64,
    ) -> (RecordOutcome, Option<ReviewEntry>) {
        if rules.is_empty() {
            let level = self.level_of(subject, now);
            return (
                RecordOutcome {
                    level,
                    ..RecordOutcome::default()
                },
                None,
            );
        }
        let csam = rules.contains(&"RULE-MIST-005");
        let extraction = rules.contains(&"RULE-MIST-010");
        if !self.room_for(subject, now) {
            return (
                RecordOutcome {
                    level: 1,
                    ..RecordOutcome::default()
                },
                None,
            );
        }
        let window = ms(self.cfg.level2_window);
        let mut entry = None;
        let severe_count;
        {
            let mut state = self
                .subjects
                .entry(*subject)
                .or_insert_with(|| SubjectState::new(now));
            state.last_hit_ms = Some(now);
            state.last_seen = now;
            if extraction && !self.cfg.rate_limit.is_zero() {
                let until = now.saturating_add(ms(self.cfg.rate_limit));
                state.rate_limited_until = Some(state.rate_limited_until.unwrap_or(0).max(until));
            }
            while state
                .hits
                .front()
                .is_some_and(|(t, _)| now.saturating_sub(*t) > window)
            {
                state.hits.pop_front();
            }
            state
                .hits
                .push_back((now, rules.iter().map(|r| Box::from(*r)).collect()));
            while state.hits.len() > MAX_HITS_KEPT {
                state.hits.pop_front();
            }
            let already = state.suspended_until.is_some_and(|t| t > now);
            if action >= Action::Block && !already {
                while state
                    .severe
                    .front()
                    .is_some_and(|(t, _)| now.saturating_sub(*t) > window)
                {
                    state.severe.pop_front();
                }
                state.severe.push_back((now, decision_id.to_string()));
                while state.severe.len() > self.cfg.level2_hits as usize {
                    state.severe.pop_front();
                }
            }
            severe_count = state.severe.len() as u32;
            if !already && (csam || state.severe.len() >= self.cfg.level2_hits as usize) {
                let until = now.saturating_add(ms(self.cfg.suspension));
                state.suspended_until = Some(until);
                let mut counts: BTreeMap<String, u32> = BTreeMap::new();
                for (_, rs) in &state.hits {
                    for r in rs.iter() {
                        *counts.entry(r.to_string()).or_default() += 1;
                    }
                }
                let mut record_ids: Vec<String> =
                    state.severe.drain(..).map(|(_, id)| id).collect();
                if record_ids.is_empty() {
                    record_ids.push(decision_id.to_string());
                }
                entry = Some(ReviewEntry {
                    subject: subject.hex(),
                    rules: counts.into_iter().collect(),
                    suspended_unix_ms: now,
                    until_unix_ms: until,
                    record_ids,
                });
            }
        }
        let mut outcome = RecordOutcome {
            level: self.level_of(subject, now),
            suspended_now: entry.is_some(),
            alert: false,
            severe_count: if entry.is_some() { 0 } else { severe_count },
        };
        if let Some(e) = &entry {
            self.add_review(e.clone());
            metrics::counter!("mistguard_escalation_level2_total").increment(1);
            outcome.alert = self.note_level2(subject, now);
            if outcome.alert {
                outcome.level = 3;
            }
        }
        metrics::gauge!("mistguard_escalation_subjects").set(self.subjects.len() as f64);
        (outcome, entry)
    }

    /// The subject's level now (0, 1 or 2).
    pub fn level_of(&self, subject: &SubjectKey, now: u64) -> u32 {
        match self.check(subject, now) {
            Gate::Suspended => 2,
            Gate::Open { level } | Gate::RateLimited { level, .. } => level,
        }
    }

    fn reviews_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ReviewEntry>> {
        self.reviews.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or lengthens) a review entry and the suspension it stands for: used for a local
    /// suspension, one Redis reports, and the entries kept on disk at start.
    pub fn add_review(&self, e: ReviewEntry) {
        if let Some(key) = SubjectKey::from_hex(&e.subject) {
            self.mirror(
                &key,
                &SubjectGate {
                    suspended_until_ms: Some(e.until_unix_ms),
                    ..SubjectGate::default()
                },
                e.suspended_unix_ms,
            );
        }
        let mut q = self.reviews_lock();
        match q.get_mut(&e.subject) {
            Some(old) if old.until_unix_ms >= e.until_unix_ms => {}
            _ => {
                q.insert(e.subject.clone(), e);
            }
        }
        metrics::gauge!("mistguard_review_queue").set(q.len() as f64);
    }

    /// The review entry of one subject (hash), if it is in the queue.
    pub fn review(&self, subject_hex: &str) -> Option<ReviewEntry> {
        self.reviews_lock().get(subject_hex).cloned()
    }

    /// The review queue: subjects suspended at `now`, oldest first.
    pub fn reviews(&self, limit: usize, now: u64) -> Vec<ReviewEntry> {
        let mut q = self.reviews_lock();
        q.retain(|_, e| e.until_unix_ms > now);
        metrics::gauge!("mistguard_review_queue").set(q.len() as f64);
        let mut v: Vec<ReviewEntry> = q.values().cloned().collect();
        v.sort_by(|a, b| (a.suspended_unix_ms, &a.subject).cmp(&(b.suspended_unix_ms, &b.subject)));
        v.truncate(limit);
        v
    }

    /// Lifts a suspension (and a rate limit): true when the subject was suspended.
    pub fn lift(&self, subject_hex: &str, now: u64) -> bool {
        let had_entry = {
            let mut q = self.reviews_lock();
            let had = q.remove(subject_hex).is_some_and(|e| e.until_unix_ms > now);
            metrics::gauge!("mistguard_review_queue").set(q.len() as f64);
            had
        };
        let mut suspended = false;
        if let Some(key) = SubjectKey::from_hex(subject_hex) {
            if let Some(mut s) = self.subjects.get_mut(&key) {
                suspended = s.suspended_until.is_some_and(|t| t > now);
                s.suspended_until = None;
                s.rate_limited_until = None;
                s.severe.clear();
            }
        }
        had_entry || suspended
    }

    /// Returns whether this level-2 event raised the level-3 alert.
    fn note_level2(&self, subject: &SubjectKey, now: u64) -> bool {
        let mut w = self.level2_recent.lock().unwrap_or_else(|e| e.into_inner());
        let window = ms(self.cfg.level3_window);
        while w
            .entries
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > window)
        {
            w.entries.pop_front();
        }
        w.entries.retain(|(_, s)| s != subject);
        w.entries.push_back((now, *subject));
        // Bounded: only the newest `level3_subjects` entries matter.
        while w.entries.len() > self.cfg.level3_subjects as usize {
            w.entries.pop_front();
        }
        let recently_alerted = w
            .alerted_at
            .is_some_and(|t| now.saturating_sub(t) <= window);
        if w.entries.len() >= self.cfg.level3_subjects as usize && !recently_alerted {
            w.alerted_at = Some(now);
            self.alerts
                .raise("level2_subjects", w.entries.len(), self.cfg.level3_window);
            return true;
        }
        false
    }

    /// Drops subjects whose state has expired.
    pub fn sweep(&self, now: u64) {
        let keep_for = ms(self.cfg.level2_window.max(self.cfg.rate_limit));
        self.subjects.retain(|_, s| {
            s.suspended_until.is_some_and(|t| t > now)
                || s.rate_limited_until.is_some_and(|t| t > now)
                || now.saturating_sub(s.last_seen) <= keep_for
        });
        metrics::gauge!("mistguard_escalation_subjects").set(self.subjects.len() as f64);
        self.reviews_lock().retain(|_, e| e.until_unix_ms > now);
    }
}

/// A level-3 alert as the review console lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentAlert {
    pub unix_ms: u64,
    pub cause: &'static str,
    pub count: usize,
    pub window_s: u64,
}

/// The newest level-3 alerts of one daemon, at most [`Alerts::KEEP`], newest last. Held by the
/// daemon (not a global), so daemons sharing a process do not see each other's alerts.
#[derive(Clone, Default)]
pub struct Alerts(std::sync::Arc<Mutex<VecDeque<RecentAlert>>>);

impl Alerts {
    pub const KEEP: usize = 50;

    /// Raises the alert ([`alert`]) and keeps it in the list.
    pub fn raise(&self, cause: &'static str, count: usize, window: std::time::Duration) {
        alert(cause, count, window);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, ms);
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() == Self::KEEP {
            list.pop_front();
        }
        list.push_back(RecentAlert {
            unix_ms: now,
            cause,
            count,
            window_s: window.as_secs(),
        });
    }

    /// The kept alerts, newest first.
    pub fn recent(&self) -> Vec<RecentAlert> {
        let list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().rev().cloned().collect()
    }
}

/// The level-3 alert: a counter and one WARN line (target `mistguard::alert`), for many distinct
/// subjects reaching level 2 (`cause` `level2_subjects`) or for remote moderation flagging
/// many texts the local rules passed (`novel_attack`).
pub fn alert(cause: &'static str, count: usize, window: std::time::Duration) {
    metrics::counter!("mistguard_escalation_alerts_total", "level" => "3", "cause" => cause)
        .increment(1);
    let what = if cause == "novel_attack" {
        "escalation level 3: remote moderation flagged many texts the local rules passed (novel attack vector)"
    } else {
        "escalation level 3: many distinct subjects reached level 2"
    };
    tracing::warn!(
        target: "mistguard::alert",
        level = 3,
        cause,
        count,
        window_s = window.as_secs(),
        "{what}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SubjectKey {
        SubjectKey([n; 16])
    }

    fn esc() -> Escalation {
        Escalation::new(EscalationConfig {
            level3_subjects: 2,
            max_subjects: 3,
            ..Default::default()
        })
    }

    const T0: u64 = 1_800_000_000_000;
    const S: u64 = 1000;

    fn rec(e: &Escalation, s: u8, id: &str, a: Action, rule: &str, t: u64) -> RecordOutcome {
        e.record(&key(s), id, a, &[rule], t).0
    }

    #[test]
    fn three_blocks_in_the_window_suspend_and_queue_for_review() {
        let e = esc();
        assert_eq!(e.check(&key(1), T0), Gate::Open { level: 0 });
        assert_eq!(rec(&e, 1, "a", Action::Flag, "RULE-MIST-008", T0).level, 1);
        assert_eq!(rec(&e, 1, "b", Action::Block, "RULE-MIST-001", T0).level, 1);
        let o = rec(&e, 1, "c", Action::Block, "RULE-MIST-001", T0 + 60 * S);
        assert_eq!((o.level, o.severe_count), (1, 2));
        let (o, entry) = e.record(
            &key(1),
            "d",
            Action::HardBlock,
            &["RULE-MIST-006"],
            T0 + 120 * S,
        );
        assert!(o.suspended_now);
        assert_eq!(o.level, 2);
        let entry = entry.expect("a review entry");
        assert_eq!(entry.record_ids, ["b", "c", "d"]);
        assert_eq!(
            entry.rules,
            [
                ("RULE-MIST-001".to_string(), 2),
                ("RULE-MIST-006".to_string(), 1),
                ("RULE-MIST-008".to_string(), 1)
            ]
        );
        assert_eq!(entry.until_unix_ms, T0 + 120 * S + 900 * S);
        assert_eq!(e.check(&key(1), T0 + 121 * S), Gate::Suspended);
        assert_eq!(e.reviews(10, T0 + 121 * S), [entry]);
        // Decisions while suspended do not suspend again.
        let o = rec(&e, 1, "e", Action::Block, "RULE-MIST-001", T0 + 130 * S);
        assert!(!o.suspended_now);
        assert_eq!(o.level, 2);
        // The suspension expires after 15 minutes, and leaves the queue.
        assert_eq!(
            e.check(&key(1), T0 + (120 + 901) * S),
            Gate::Open { level: 0 }
        );
        assert!(e.reviews(10, T0 + (120 + 901) * S).is_empty());
    }

    #[test]
    fn blocks_spread_beyond_the_window_do_not_suspend() {
        let e = esc();
        for i in 0..5u64 {
            let o = rec(&e, 1, "x", Action::Block, "RULE-MIST-001", T0 + i * 400 * S);
            assert!(!o.suspended_now, "decision {i}");
        }
    }

    #[test]
    fn csam_suspends_on_first_hit_and_extraction_rate_limits() {
        let e = esc();
        assert!(rec(&e, 1, "a", Action::Block, "RULE-MIST-005", T0).suspended_now);
        assert_eq!(e.check(&key(1), T0), Gate::Suspended);
        rec(&e, 2, "b", Action::RateLimit, "RULE-MIST-010", T0);
        assert_eq!(
            e.check(&key(2), T0 + S),
            Gate::RateLimited {
                level: 1,
                until_ms: T0 + 300 * S
            }
        );
        assert_eq!(e.check(&key(2), T0 + 301 * S), Gate::Open { level: 1 });
    }

    #[test]
    fn lift_ends_a_suspension_and_mirror_never_shortens() {
        let e = esc();
        rec(&e, 1, "a", Action::Block, "RULE-MIST-005", T0);
        let hex = key(1).hex();
        assert!(e.lift(&hex, T0 + S));
        assert_eq!(e.check(&key(1), T0 + S), Gate::Open { level: 1 });
        assert!(!e.lift(&hex, T0 + S), "nothing left to lift");
        let long = SubjectGate {
            suspended_until_ms: Some(T0 + 100 * S),
            ..SubjectGate::default()
        };
        let short = SubjectGate {
            suspended_until_ms: Some(T0 + 10 * S),
            ..SubjectGate::default()
        };
        e.mirror(&key(1), &long, T0);
        e.mirror(&key(1), &short, T0);
        assert_eq!(e.state(&key(1), T0).suspended_until_ms, Some(T0 + 100 * S));
    }

    #[test]
    fn distinct_subjects_at_level2_raise_level3_once() {
        let e = esc();
        assert!(!rec(&e, 1, "a", Action::Block, "RULE-MIST-005", T0).alert);
        let o = rec(&e, 2, "b", Action::Block, "RULE-MIST-005", T0);
        assert!(o.alert);
        assert_eq!(o.level, 3);
        assert!(!rec(&e, 3, "c", Action::Block, "RULE-MIST-005", T0).alert);
    }

    #[test]
    fn state_is_bounded_and_expires() {
        let e = esc();
        for n in 0..3 {
            rec(&e, n, "a", Action::Flag, "RULE-MIST-008", T0);
        }
        assert_eq!(e.tracked(), 3);
        // Full: a fourth subject is not tracked while the others are live.
        rec(&e, 9, "a", Action::Flag, "RULE-MIST-008", T0);
        assert_eq!(e.tracked(), 3);
        assert_eq!(e.check(&key(9), T0), Gate::Open { level: 0 });
        // After the window the old entries are swept to make room.
        let later = T0 + 3600 * S;
        rec(&e, 9, "a", Action::Flag, "RULE-MIST-008", later);
        assert_eq!(e.tracked(), 1);
        assert_eq!(e.check(&key(9), later), Gate::Open { level: 1 });
    }
}
