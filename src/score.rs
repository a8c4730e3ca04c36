//! Scoring: hits add up to a score per rule, within a window; a rule fires at its threshold.
//!
//! A rule's score over a window of text is the sum of the weights of the *distinct* triggers of
//! that rule whose hits start in it: a trigger that hits twice counts once, so repeating a word
//! does not make it worse, while two different pieces of evidence (weight 0.5 each: a group term
//! and a generalisation) add up to 1.0. The window is the rule's `window` (policy.toml, in bytes
//! of the original text): hits whose starts are further apart than that do not add up.
//!
//! The rule fires at the first window (by its end) whose score reaches the threshold. From then
//! on every hit of the rule is reported: those of that window and everything after it. Hits
//! before that window are never reported. The definition depends only on the set of hits, not on
//! the order a scan finds them, so a stream and the whole text agree.
//!
//! A stream decides a window once no hit still to be found can start in it: every hit not found
//! yet starts at or after the scan's release bound ([`RuleState::settle`] takes it as `floor`).
//! A hit held by a rule that has not fired is dropped once every window that could hold it is
//! decided, so a below-threshold hit holds a stream's release back by at most the window, not
//! until the stream ends.

/// A trigger's match, before or after its rule's score is known: the trigger (index into the
/// ruleset's triggers) and the span in the original text. Kept instead of a full
/// [`Hit`](crate::engine::Hit) while a rule holds it (24 bytes, not 88).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    pub trigger: u32,
    pub start: u64,
    pub end: u64,
}

/// Most hits a rule holds while it has not fired; past it, only the first hit of each trigger is
/// kept. Without a cap, a stream that repeats one half-weight trigger inside a huge window would
/// grow without bound. (The same bound as the hits a stream keeps for its verdict.)
pub const MAX_HELD_HITS: usize = 4096;

/// Weights are decimal fractions: allow for float rounding when they add up.
const EPSILON: f32 = 1e-4;

/// The score of one rule in one text or stream.
#[derive(Clone, Debug, Default)]
pub struct RuleState {
    pub fired: bool,
    /// Sum of the weights of the distinct triggers reported (0 until the rule fires).
    pub score: f32,
    /// Distinct triggers reported.
    pub seen: Vec<u32>,
    /// Hits not reported yet, by start (see [`MAX_HELD_HITS`]).
    /// Empty once the rule has fired.
    pub held: Vec<Match>,
    /// Every window that ends before this offset is decided (none reached the threshold).
    decided: u64,
}

impl RuleState {
    /// Adds a match of a trigger of this rule: reported at once (appended to `out`) if the rule
    /// has fired, held otherwise. Its start must not be before the `floor` of the last
    /// [`settle`](Self::settle) (a scan finds no hit before its release bound).
    pub fn add(&mut self, hit: Match, weight: f32, out: &mut Vec<Match>) {
        debug_assert!(
            hit.start >= self.decided || self.fired,
            "hit before a decided window"
        );
        if self.fired {
            self.report(hit, weight, out);
            return;
        }
        // Past the cap, only a trigger not held yet is kept (new evidence); repeats add nothing
        // to a score, and the cap is out of reach unless a window spans many kilobytes.
        if self.held.len() < MAX_HELD_HITS || !self.held.iter().any(|h| h.trigger == hit.trigger) {
            let key = (hit.start, hit.end, hit.trigger);
            let i = self
                .held
                .partition_point(|h| (h.start, h.end, h.trigger) <= key);
            self.held.insert(i, hit);
        }
    }

    fn report(&mut self, hit: Match, weight: f32, out: &mut Vec<Match>) {
        if !self.seen.contains(&hit.trigger) {
            self.seen.push(hit.trigger);
            self.score += weight;
        }
        out.push(hit);
    }

    /// Decides the windows that end before `floor` (no hit still to be added starts before it;
    /// `u64::MAX` at the end of the text), in order. If one reaches `threshold`, the rule fires:
    /// the held hits from that window's start on are appended to `out`, and true is returned.
    /// Otherwise the held hits that no undecided window can hold any more are dropped.
    pub fn settle(
        &mut self,
        floor: u64,
        window: u64,
        threshold: f32,
        weight: impl Fn(u32) -> f32,
        out: &mut Vec<Match>,
    ) -> bool {
        if self.fired {
            return false;
        }
        let mut distinct: Vec<u32> = Vec::new();
        let mut j = self.held.partition_point(|h| h.start < self.decided);
        while j < self.held.len() && self.held[j].start < floor {
            // The window ending at this hit's start (the best score of any window ending before
            // the next hit's start): every held hit that starts in [end - window, end].
            let end = self.held[j].start;
            let hi = self.held.partition_point(|h| h.start <= end);
            let lo = self
                .held
                .partition_point(|h| h.start < end.saturating_sub(window));
            distinct.clear();
            let mut score = 0.0;
            for h in &self.held[lo..hi] {
                if !distinct.contains(&h.trigger) {
                    distinct.push(h.trigger);
                    score += weight(h.trigger);
                }
            }
            if score + EPSILON >= threshold {
                self.fired = true;
                for h in std::mem::take(&mut self.held).into_iter().skip(lo) {
                    self.report(h, weight(h.trigger), out);
                }
                return true;
            }
            j = hi;
        }
        self.decided = self.decided.max(floor);
        // A hit is in windows ending from its start to its start + window.
        let gone = self
            .held
            .partition_point(|h| h.start.saturating_add(window) < self.decided);
        if gone > 0 {
            self.held.drain(..gone);
            if self.held.is_empty() {
                self.held = Vec::new();
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

    fn hit(trigger: u32, start: u64) -> Match {
        Match {
            trigger,
            start,
            end: start + 1,
        }
    }

    const HALF: fn(u32) -> f32 = |_| 0.5;

    #[test]
    fn distinct_triggers_add_up_repeats_do_not() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        st.add(hit(1, 0), 0.5, &mut out);
        st.add(hit(1, 5), 0.5, &mut out);
        assert!(!st.settle(u64::MAX, 100, 1.0, HALF, &mut out));
        assert!(out.is_empty(), "one trigger twice is still half");

        let mut st = RuleState::default();
        st.add(hit(1, 0), 0.5, &mut out);
        st.add(hit(1, 5), 0.5, &mut out);
        st.add(hit(2, 9), 0.5, &mut out);
        assert!(st.settle(u64::MAX, 100, 1.0, HALF, &mut out));
        assert_eq!(out.len(), 3, "held hits are reported when the rule fires");
        assert_eq!(st.score, 1.0);
        st.add(hit(3, 20), 0.5, &mut out);
        assert_eq!(out.len(), 4, "after firing, a hit is reported at once");
        assert_eq!(st.score, 1.5);
    }

    #[test]
    fn a_window_is_decided_only_when_no_hit_can_still_enter_it() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        st.add(hit(1, 10), 0.5, &mut out);
        st.add(hit(2, 50), 0.5, &mut out);
        // A hit still to be found may start at 50: the window ending there is open.
        assert!(!st.settle(50, 100, 1.0, HALF, &mut out));
        assert!(out.is_empty());
        assert!(st.settle(51, 100, 1.0, HALF, &mut out));
        assert_eq!(out, vec![hit(1, 10), hit(2, 50)]);
    }

    #[test]
    fn hits_further_apart_than_the_window_do_not_add_up() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        st.add(hit(1, 10), 0.5, &mut out);
        assert!(!st.settle(60, 100, 1.0, HALF, &mut out));
        assert_eq!(st.held_start(), Some(10), "still in an open window");
        assert!(!st.settle(111, 100, 1.0, HALF, &mut out));
        assert_eq!(
            st.held_start(),
            None,
            "every window that could hold it is decided"
        );
        st.add(hit(2, 111), 0.5, &mut out);
        assert!(!st.settle(u64::MAX, 100, 1.0, HALF, &mut out));
        assert!(out.is_empty());

        // 100 bytes apart: the window ending at the second start holds both.
        let mut st = RuleState::default();
        st.add(hit(1, 10), 0.5, &mut out);
        st.add(hit(2, 110), 0.5, &mut out);
        assert!(st.settle(u64::MAX, 100, 1.0, HALF, &mut out));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn hits_before_the_first_firing_window_are_not_reported() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        for (t, start) in [(1, 0), (2, 500), (3, 520), (1, 530)] {
            st.add(hit(t, start), 0.5, &mut out);
        }
        assert!(st.settle(u64::MAX, 100, 1.0, HALF, &mut out));
        let starts: Vec<u64> = out.iter().map(|h| h.start).collect();
        assert_eq!(starts, vec![500, 520, 530]);
        assert_eq!(st.score, 1.5);
    }

    /// The same hits, added in any order with any settling in between (as a stream finds
    /// them), give the same hits and score as adding them all and settling once.
    #[test]
    fn the_outcome_does_not_depend_on_the_order_hits_are_found() {
        let mut x: u64 = 7;
        let mut next = |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        let weights = [0.25f32, 0.5, 0.75, 0.5, 0.25];
        let weight = |t: u32| weights[t as usize];
        for _ in 0..2000 {
            let window = 1 + next(300);
            let n = next(12) as usize;
            let mut hits: Vec<Match> = (0..n).map(|_| hit(next(5) as u32, next(1000))).collect();
            let mut whole_out = Vec::new();
            let mut whole = RuleState::default();
            for h in &hits {
                whole.add(*h, weight(h.trigger), &mut whole_out);
            }
            whole.settle(u64::MAX, window, 1.0, weight, &mut whole_out);

            // A stream: hits arrive by start, each up to `lag` bytes late and shuffled within
            // that; the floor is the smallest start still to come.
            hits.sort_by_key(|h| h.start);
            let lag = next(200);
            let mut stream_out = Vec::new();
            let mut stream = RuleState::default();
            let mut pending: Vec<Match> = Vec::new();
            let mut rest = hits.into_iter().peekable();
            let mut pos = 0;
            while pos <= 1200 + lag {
                while rest.peek().is_some_and(|h| h.start <= pos) {
                    pending.push(rest.next().unwrap());
                }
                let mut k = 0;
                while k < pending.len() {
                    if pending[k].start + lag <= pos || next(3) == 0 {
                        let h = pending.swap_remove(k);
                        stream.add(h, weight(h.trigger), &mut stream_out);
                    } else {
                        k += 1;
                    }
                }
                let floor = pending
                    .iter()
                    .map(|h| h.start)
                    .chain(rest.peek().map(|h| h.start))
                    .min()
                    .unwrap_or(pos + 1)
                    .min(pos + 1);
                stream.settle(floor, window, 1.0, weight, &mut stream_out);
                pos += 1 + next(40);
            }
            stream.settle(u64::MAX, window, 1.0, weight, &mut stream_out);
            let key = |h: &Match| (h.start, h.trigger);
            whole_out.sort_by_key(key);
            stream_out.sort_by_key(key);
            assert_eq!(whole_out, stream_out, "window {window}");
            assert_eq!(whole.fired, stream.fired);
            assert!((whole.score - stream.score).abs() < 1e-6);
        }
    }

    #[test]
    fn held_hits_are_bounded_and_still_reported_when_the_rule_fires() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        for i in 0..3 * MAX_HELD_HITS as u64 {
            st.add(hit(1, i), 0.5, &mut out);
        }
        assert_eq!(st.held.len(), MAX_HELD_HITS);
        st.add(hit(2, 10), 0.5, &mut out);
        assert_eq!(
            st.held.len(),
            MAX_HELD_HITS + 1,
            "a new trigger is kept past the cap"
        );
        assert!(st.settle(u64::MAX, u64::MAX, 1.0, HALF, &mut out));
        assert_eq!(
            out.len(),
            MAX_HELD_HITS + 1,
            "the kept held hits are reported on firing"
        );
        assert!(
            out.iter().any(|h| h.trigger == 2),
            "with the hit that fired the rule"
        );
        assert!(st.held.is_empty());
    }

    #[test]
    fn the_first_held_hit_starts_first() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        for start in [40, 7, 90, 3, 12, 3, 55] {
            st.add(hit(1, start), 0.5, &mut out);
            let min = st.held.iter().map(|h| h.start).min();
            assert_eq!(st.held_start(), min);
        }
        assert_eq!(st.held_start(), Some(3));
    }

    #[test]
    fn tenths_reach_one() {
        let mut st = RuleState::default();
        let mut out = Vec::new();
        for i in 0..9 {
            st.add(hit(i, u64::from(i)), 0.1, &mut out);
        }
        assert!(!st.settle(u64::MAX, 1000, 1.0, |_| 0.1, &mut out));
        let mut st = RuleState::default();
        for i in 0..10 {
            st.add(hit(i, u64::from(i)), 0.1, &mut out);
        }
        assert!(st.settle(u64::MAX, 1000, 1.0, |_| 0.1, &mut out));
    }
}
