//! Scoring: hits add up to a score per rule; a rule fires at its threshold.
//!
//! A rule's score is the sum of the weights of the *distinct* triggers of that rule that hit the
//! text: a trigger that hits twice counts once, so repeating a word does not make it worse, while
//! two different pieces of evidence (weight 0.5 each: a group term and a generalisation) add up to
//! 1.0. Until a rule fires its hits are held; when it fires they are all reported at once.

/// A trigger's match, before or after its rule's score is known: the trigger (index into the
/// ruleset's triggers) and the span in the original text. Kept instead of a full
/// [`Hit`](crate::engine::Hit) while a rule holds it (24 bytes, not 88).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    pub trigger: u32,
    pub start: u64,
    pub end: u64,
}

/// Most hits a rule holds while it has not fired; later ones are dropped. Without a cap,
/// a stream that repeats one half-weight trigger would grow without bound. (The same bound as the
/// hits a stream keeps for its verdict.)
pub const MAX_HELD_HITS: usize = 4096;

/// The score of one rule in one text or stream.
#[derive(Clone, Debug, Default)]
pub struct RuleState {
    pub score: f32,
    pub fired: bool,
    /// Distinct triggers counted so far.
    pub seen: Vec<u32>,
    /// Hits of this rule while it has not fired yet (at most [`MAX_HELD_HITS`]; later ones are
    /// dropped). The first has the smallest start (what holds back a stream's release).
    pub held: Vec<Match>,
}

impl RuleState {
    /// Adds a match of a trigger of this rule. Matches that become reportable are appended to
    /// `out`. Returns true when this one made the rule fire.
    pub fn add(&mut self, hit: Match, weight: f32, threshold: f32, out: &mut Vec<Match>) -> bool {
        if !self.seen.contains(&hit.trigger) {
            self.seen.push(hit.trigger);
            self.score += weight;
        }
        if self.fired {
            out.push(hit);
            return false;
        }
        // Weights are decimal fractions: allow for float rounding when they add up.
        if self.score + 1e-4 >= threshold {
            // The held hits, then the one that made the rule fire (always reported).
            self.fired = true;
            out.append(&mut self.held);
            self.held = Vec::new();
            out.push(hit);
            return true;
        }
        if self.held.len() < MAX_HELD_HITS {
            self.held.push(hit);
            let last = self.held.len() - 1;
            if self.held[last].start < self.held[0].start {
                self.held.swap(0, last);
            }
        }
        false
    }

    /// The smallest start of a held hit.
    pub fn held_start(&self) -> Option<u64> {
        self.held.first().map(|h| h.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(trigger: u32) -> Match {
        Match {
            trigger,
            start: 0,
            end: 1,
        }
    }

    #[test]
    fn distinct_triggers_add_up_repeats_do_not() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        assert!(!st.add(hit(1), 0.5, 1.0, &mut out));
        assert!(!st.add(hit(1), 0.5, 1.0, &mut out));
        assert!(out.is_empty());
        assert!(st.add(hit(2), 0.5, 1.0, &mut out));
        assert_eq!(out.len(), 3, "held hits are reported when the rule fires");
        assert!(!st.add(hit(2), 0.5, 1.0, &mut out));
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn held_hits_are_bounded_and_still_reported_when_the_rule_fires() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        for _ in 0..3 * MAX_HELD_HITS {
            assert!(!st.add(hit(1), 0.5, 1.0, &mut out));
        }
        assert!(out.is_empty());
        assert_eq!(st.held.len(), MAX_HELD_HITS);
        assert!(st.add(hit(2), 0.5, 1.0, &mut out));
        assert_eq!(
            out.len(),
            MAX_HELD_HITS + 1,
            "the kept held hits are reported on firing"
        );
        assert_eq!(
            out.last().unwrap().trigger,
            2,
            "and the hit that fired the rule"
        );
        assert!(st.held.is_empty());
    }

    #[test]
    fn the_first_held_hit_starts_first() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        for start in [40, 7, 90, 3, 12, 3, 55] {
            let mut h = hit(1);
            h.start = start;
            st.add(h, 0.5, 1.0, &mut out);
            let min = st.held.iter().map(|h| h.start).min();
            assert_eq!(st.held_start(), min);
        }
        assert_eq!(st.held_start(), Some(3));
    }

    #[test]
    fn tenths_reach_one() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        let fired: Vec<bool> = (0..10)
            .map(|i| st.add(hit(i), 0.1, 1.0, &mut out))
            .collect();
        assert_eq!(fired.iter().filter(|f| **f).count(), 1);
        assert!(fired[9]);
    }
}
