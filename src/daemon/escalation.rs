//! The escalation matrix (SPEC "The escalation matrix"), in memory: bounded, expiring state per
//! subject hash.
//!
//! - Level 1: any hit.
//! - Level 2: `level2_hits` decisions of BLOCK or above within `level2_window` (RULE-MIST-005 on
//!   its first hit): the subject is suspended for `suspension`; its requests are answered BLOCK
//!   with the reason `suspended`.
//! - Level 3: `level3_subjects` distinct subjects reaching level 2 within `level3_window` raise an
//!   alert (a metric and a log line), once per window.
//!
//! A RULE-MIST-010 hit rate-limits the subject for `rate_limit`: its requests are answered
//! RATE_LIMIT with the reason `rate_limited`.
//!
//! The map holds at most `max_subjects` entries. When full, expired entries are swept; if it is
//! still full, a new subject is not tracked (and counted in a metric) rather than evicting one
//! that may be suspended.

use super::config::EscalationConfig;
use super::ids::SubjectKey;
use crate::action::Action;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// What a subject's state says before its text is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Open { level: u32 },
    Suspended,
    RateLimited { level: u32 },
}

/// What recording a decision changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The subject's level after the decision.
    pub level: u32,
    /// The subject reached level 2 with this decision.
    pub suspended_now: bool,
    /// This decision raised the level-3 alert.
    pub alert: bool,
}

#[derive(Debug)]
struct SubjectState {
    /// Times of recent decisions of BLOCK or above (at most `level2_hits`).
    severe: VecDeque<Instant>,
    any_hit: bool,
    suspended_until: Option<Instant>,
    rate_limited_until: Option<Instant>,
    last_seen: Instant,
}

pub struct Escalation {
    cfg: EscalationConfig,
    subjects: DashMap<SubjectKey, SubjectState>,
    /// Subjects that reached level 2, newest last, within `level3_window`.
    level2_recent: Mutex<Level3Window>,
}

#[derive(Default)]
struct Level3Window {
    entries: VecDeque<(Instant, SubjectKey)>,
    alerted_at: Option<Instant>,
}

impl Escalation {
    pub fn new(cfg: EscalationConfig) -> Escalation {
        Escalation {
            cfg,
            subjects: DashMap::new(),
            level2_recent: Mutex::new(Level3Window::default()),
        }
    }

    /// How long a subject that reaches level 2 is suspended.
    pub fn suspension(&self) -> std::time::Duration {
        self.cfg.suspension
    }

    pub fn tracked(&self) -> usize {
        self.subjects.len()
    }

    /// The subject's gate before classifying its text.
    pub fn check(&self, subject: &SubjectKey, now: Instant) -> Gate {
        let Some(state) = self.subjects.get(subject) else {
            return Gate::Open { level: 0 };
        };
        if state.suspended_until.is_some_and(|t| t > now) {
            return Gate::Suspended;
        }
        let level = u32::from(state.any_hit);
        if state.rate_limited_until.is_some_and(|t| t > now) {
            return Gate::RateLimited { level };
        }
        Gate::Open { level }
    }

    /// Records a decision about the subject's text: its action and the rules that fired.
    pub fn record<'a>(
        &self,
        subject: &SubjectKey,
        action: Action,
        rules: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) -> Outcome {
        let mut any_hit = false;
        let mut csam = false;
        let mut extraction = false;
        for r in rules {
            any_hit = true;
            csam |= r == "RULE-MIST-005";
            extraction |= r == "RULE-MIST-010";
        }
        if !any_hit {
            return Outcome {
                level: self.level_of(subject, now),
                ..Outcome::default()
            };
        }
        if !self.subjects.contains_key(subject) && self.subjects.len() >= self.cfg.max_subjects {
            self.sweep(now);
            if self.subjects.len() >= self.cfg.max_subjects {
                metrics::counter!("mistguard_escalation_untracked_total").increment(1);
                return Outcome {
                    level: 1,
                    ..Outcome::default()
                };
            }
        }
        let mut suspended_now = false;
        {
            let mut state = self
                .subjects
                .entry(*subject)
                .or_insert_with(|| SubjectState {
                    severe: VecDeque::new(),
                    any_hit: false,
                    suspended_until: None,
                    rate_limited_until: None,
                    last_seen: now,
                });
            state.any_hit = true;
            state.last_seen = now;
            if extraction && !self.cfg.rate_limit.is_zero() {
                state.rate_limited_until = Some(now + self.cfg.rate_limit);
            }
            let already = state.suspended_until.is_some_and(|t| t > now);
            if action >= Action::Block {
                let window = self.cfg.level2_window;
                while state
                    .severe
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > window)
                {
                    state.severe.pop_front();
                }
                state.severe.push_back(now);
                while state.severe.len() > self.cfg.level2_hits as usize {
                    state.severe.pop_front();
                }
            }
            if !already && (csam || state.severe.len() >= self.cfg.level2_hits as usize) {
                state.suspended_until = Some(now + self.cfg.suspension);
                state.severe.clear();
                suspended_now = true;
            }
        }
        let mut outcome = Outcome {
            level: self.level_of(subject, now),
            suspended_now,
            alert: false,
        };
        if suspended_now {
            metrics::counter!("mistguard_escalation_level2_total").increment(1);
            outcome.alert = self.note_level2(subject, now);
            if outcome.alert {
                outcome.level = 3;
            }
        }
        metrics::gauge!("mistguard_escalation_subjects").set(self.subjects.len() as f64);
        outcome
    }

    fn level_of(&self, subject: &SubjectKey, now: Instant) -> u32 {
        match self.check(subject, now) {
            Gate::Suspended => 2,
            Gate::Open { level } | Gate::RateLimited { level } => level,
        }
    }

    /// Returns whether this level-2 event raised the level-3 alert.
    fn note_level2(&self, subject: &SubjectKey, now: Instant) -> bool {
        let mut w = self.level2_recent.lock().unwrap_or_else(|e| e.into_inner());
        let window = self.cfg.level3_window;
        while w
            .entries
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > window)
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
            .is_some_and(|t| now.duration_since(t) <= window);
        if w.entries.len() >= self.cfg.level3_subjects as usize && !recently_alerted {
            w.alerted_at = Some(now);
            metrics::counter!("mistguard_escalation_alerts_total", "level" => "3").increment(1);
            tracing::warn!(
                target: "mistguard::alert",
                level = 3,
                subjects = w.entries.len(),
                window_s = window.as_secs(),
                "escalation level 3: many distinct subjects reached level 2"
            );
            return true;
        }
        false
    }

    /// Drops subjects whose state has expired.
    pub fn sweep(&self, now: Instant) {
        let keep_for = self.cfg.level2_window.max(self.cfg.rate_limit);
        self.subjects.retain(|_, s| {
            s.suspended_until.is_some_and(|t| t > now)
                || s.rate_limited_until.is_some_and(|t| t > now)
                || now.duration_since(s.last_seen) <= keep_for
        });
        metrics::gauge!("mistguard_escalation_subjects").set(self.subjects.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    #[test]
    fn three_blocks_in_the_window_suspend() {
        let e = esc();
        let t0 = Instant::now();
        let s = key(1);
        assert_eq!(e.check(&s, t0), Gate::Open { level: 0 });
        assert_eq!(e.record(&s, Action::Flag, ["RULE-MIST-008"], t0).level, 1);
        assert_eq!(e.record(&s, Action::Block, ["RULE-MIST-001"], t0).level, 1);
        assert_eq!(
            e.record(
                &s,
                Action::Block,
                ["RULE-MIST-001"],
                t0 + Duration::from_secs(60)
            )
            .level,
            1
        );
        let o = e.record(
            &s,
            Action::HardBlock,
            ["RULE-MIST-006"],
            t0 + Duration::from_secs(120),
        );
        assert!(o.suspended_now);
        assert_eq!(o.level, 2);
        assert_eq!(e.check(&s, t0 + Duration::from_secs(121)), Gate::Suspended);
        // The suspension expires after 15 minutes.
        assert_eq!(
            e.check(&s, t0 + Duration::from_secs(120 + 901)),
            Gate::Open { level: 1 }
        );
    }

    #[test]
    fn blocks_spread_beyond_the_window_do_not_suspend() {
        let e = esc();
        let t0 = Instant::now();
        let s = key(1);
        for i in 0..5u64 {
            let o = e.record(
                &s,
                Action::Block,
                ["RULE-MIST-001"],
                t0 + Duration::from_secs(i * 400),
            );
            assert!(!o.suspended_now, "decision {i}");
        }
    }

    #[test]
    fn csam_suspends_on_first_hit_and_extraction_rate_limits() {
        let e = esc();
        let t0 = Instant::now();
        assert!(
            e.record(&key(1), Action::Block, ["RULE-MIST-005"], t0)
                .suspended_now
        );
        assert_eq!(e.check(&key(1), t0), Gate::Suspended);
        e.record(&key(2), Action::RateLimit, ["RULE-MIST-010"], t0);
        assert_eq!(
            e.check(&key(2), t0 + Duration::from_secs(1)),
            Gate::RateLimited { level: 1 }
        );
        assert_eq!(
            e.check(&key(2), t0 + Duration::from_secs(301)),
            Gate::Open { level: 1 }
        );
    }

    #[test]
    fn distinct_subjects_at_level2_raise_level3_once() {
        let e = esc();
        let t0 = Instant::now();
        assert!(
            !e.record(&key(1), Action::Block, ["RULE-MIST-005"], t0)
                .alert
        );
        let o = e.record(&key(2), Action::Block, ["RULE-MIST-005"], t0);
        assert!(o.alert);
        assert_eq!(o.level, 3);
        assert!(
            !e.record(&key(3), Action::Block, ["RULE-MIST-005"], t0)
                .alert
        );
    }

    #[test]
    fn state_is_bounded_and_expires() {
        let e = esc();
        let t0 = Instant::now();
        for n in 0..3 {
            e.record(&key(n), Action::Flag, ["RULE-MIST-008"], t0);
        }
        assert_eq!(e.tracked(), 3);
        // Full: a fourth subject is not tracked while the others are live.
        e.record(&key(9), Action::Flag, ["RULE-MIST-008"], t0);
        assert_eq!(e.tracked(), 3);
        assert_eq!(e.check(&key(9), t0), Gate::Open { level: 0 });
        // After the window the old entries are swept to make room.
        let later = t0 + Duration::from_secs(3600);
        e.record(&key(9), Action::Flag, ["RULE-MIST-008"], later);
        assert_eq!(e.tracked(), 1);
        assert_eq!(e.check(&key(9), later), Gate::Open { level: 1 });
    }
}
