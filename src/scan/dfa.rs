//! What both views share: the regex DFAs with their reverse twins ([`RegexDfa`]), the loop that
//! walks an unanchored DFA over a chunk ([`dfa_loop`]) and the window a match's start is searched
//! back in ([`dfa_window`]), the start-state and depth tables of aho-corasick automata, and the
//! size-limited building of automata over many patterns ([`build_halving`]).
//!
//! Invariant kept here: a DFA's state in a stream is its `StateID` and a `free` offset, the
//! offset before which none of its partial matches can have started ([`DfaAt`]); a reverse search
//! for a match's start never goes back past it, in whole texts as in streams.

use crate::rules::{syntax_config, CompiledRuleset, LoadError, View};
use aho_corasick::automaton::Automaton as AcAutomaton;
use regex_automata::dfa::{dense, Automaton as DfaAutomaton, StartKind};
use regex_automata::util::primitives::StateID;
use regex_automata::{nfa::thompson, Anchored, Input, MatchKind, PatternID};

/// Size limit of one view's DFA (forward), and of its determinization.
pub const DFA_SIZE_LIMIT: usize = 64 << 20;

/// A dense DFA (forward, unanchored, all matches) with its reverse twin for finding starts.
pub(crate) struct RegexDfa {
    pub(crate) fwd: dense::DFA<Vec<u32>>,
    /// Anchored reverse DFA over the regex patterns only, one start per pattern.
    pub(crate) rev: Option<dense::DFA<Vec<u32>>>,
    /// Unanchored start state with no look-behind (stream start).
    pub(crate) start: StateID,
    /// Bytes that keep the DFA in `start` (skipped by [`dfa_loop`]).
    pub(crate) stay: Box<[bool]>,
}

impl RegexDfa {
    pub(crate) fn build_limited(
        view: View,
        fwd_patterns: &[String],
        rev_patterns: &[String],
        limit: usize,
    ) -> Result<RegexDfa, String> {
        let thompson = thompson::Config::new().utf8(view == View::Word);
        let fwd = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .start_kind(StartKind::Unanchored)
                    .specialize_start_states(true)
                    .dfa_size_limit(Some(limit))
                    .determinize_size_limit(Some(limit)),
            )
            .syntax(syntax_config(view))
            .thompson(thompson.clone())
            .build_many(fwd_patterns)
            .map_err(|e| e.to_string())?;
        let rev = if rev_patterns.is_empty() {
            None
        } else {
            Some(
                dense::Builder::new()
                    .configure(
                        dense::Config::new()
                            .match_kind(MatchKind::All)
                            .start_kind(StartKind::Anchored)
                            .starts_for_each_pattern(true)
                            .dfa_size_limit(Some(DFA_SIZE_LIMIT))
                            .determinize_size_limit(Some(DFA_SIZE_LIMIT)),
                    )
                    .syntax(syntax_config(view))
                    .thompson(thompson.reverse(true))
                    .build_many(rev_patterns)
                    .map_err(|e| e.to_string())?,
            )
        };
        let start = fwd
            .start_state(&regex_automata::util::start::Config::new().anchored(Anchored::No))
            .map_err(|e| e.to_string())?;
        let stay = (0..=255u8)
            .map(|b| fwd.next_state(start, b) == start)
            .collect();
        Ok(RegexDfa {
            fwd,
            rev,
            start,
            stay,
        })
    }

    pub(crate) fn memory_usage(&self) -> usize {
        self.fwd.memory_usage() + self.rev.as_ref().map_or(0, |r| r.memory_usage())
    }

    /// The leftmost start of pattern `rev_pid` matching `window[..end]` exactly up to `end`.
    pub(crate) fn find_start(
        &self,
        window: &[u8],
        lo: usize,
        end: usize,
        rev_pid: PatternID,
    ) -> Option<usize> {
        let rev = self.rev.as_ref()?;
        let input = Input::new(window)
            .range(lo..end)
            .anchored(Anchored::Pattern(rev_pid));
        rev.try_search_rev(&input)
            .ok()
            .flatten()
            .map(|hm| hm.offset())
    }
}

/// Size limit of one word-view regex group's DFA: a rule whose regexes exceed it together is
/// split into several DFAs (each costs one more table lookup per byte).
pub const GROUP_DFA_LIMIT: usize = 16 << 20;

/// Builds automata over `patterns` with `build`, halving the set until each part fits under
/// [`GROUP_DFA_LIMIT`]. A single pattern that does not fit is refused with its trigger's place;
/// `trigger` names the trigger of a pattern, `hint` says what to do about it.
pub(crate) fn build_halving<P, G>(
    rs: &CompiledRuleset,
    patterns: &[P],
    trigger: &dyn Fn(&P) -> u32,
    build: &dyn Fn(&[P]) -> Result<G, String>,
    hint: &str,
    out: &mut Vec<G>,
) -> Result<(), LoadError> {
    if patterns.is_empty() {
        return Ok(());
    }
    match build(patterns) {
        Ok(g) => {
            out.push(g);
            Ok(())
        }
        Err(e) if patterns.len() == 1 => {
            let t = &rs.triggers[trigger(&patterns[0]) as usize];
            Err(LoadError {
                file: t.file.to_string(),
                line: Some(t.line),
                message: format!(
                    "pattern of trigger `{}` alone needs a DFA over {} MiB ({e}); {hint}",
                    t.id,
                    GROUP_DFA_LIMIT >> 20
                ),
            })
        }
        Err(_) => {
            let (a, b) = patterns.split_at(patterns.len() / 2);
            build_halving(rs, a, trigger, build, hint, out)?;
            build_halving(rs, b, trigger, build, hint, out)
        }
    }
}

pub(crate) const SHORTEN: &str = "shorten its counted repetitions or alternations";

/// A DFA's state in a stream, and its `free` offset (see [`dfa_loop`]); offsets fit in 32 bits
/// (a stream is limited to 4 GiB).
pub(crate) type DfaAt = (StateID, u32);

/// The depth of every state of an aho-corasick automaton (the length of the pattern prefix it
/// stands for): a breadth-first walk from the start state, where the first visit of a state is
/// at its depth (no input shorter than the prefix can end in it). State ids are multiples of a
/// power of two (the DFA's stride): returns the depths indexed by id shifted right by its log,
/// and that log. 255 stands for unknown or deeper (the caller falls back to the longest
/// pattern).
pub(crate) fn ac_depths<A: AcAutomaton>(ac: &A) -> (Vec<u8>, u32) {
    use aho_corasick::automaton::StateID as Sid;
    let Ok(start) = ac.start_state(aho_corasick::Anchored::No) else {
        return (Vec::new(), 0);
    };
    let mut seen: std::collections::HashMap<Sid, u8> = std::collections::HashMap::new();
    seen.insert(start, 0);
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(s) = queue.pop_front() {
        let d = seen[&s];
        if d == u8::MAX {
            continue;
        }
        for b in 0..=255u8 {
            let n = ac.next_state(aho_corasick::Anchored::No, s, b);
            if ac.is_dead(n) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = seen.entry(n) {
                e.insert(d + 1);
                queue.push_back(n);
            }
        }
    }
    let shift = seen
        .keys()
        .map(|s| s.as_u32())
        .filter(|&s| s != 0)
        .map(u32::trailing_zeros)
        .min()
        .unwrap_or(0);
    let top = seen.keys().map(|s| s.as_u32() >> shift).max().unwrap_or(0);
    let mut v = vec![u8::MAX; top as usize + 1];
    for (s, d) in seen {
        v[(s.as_u32() >> shift) as usize] = d;
    }
    (v, shift)
}

/// The bytes that keep an aho-corasick automaton in its (unanchored) start state `start`.
pub(crate) fn ac_stay<A: AcAutomaton>(
    ac: &A,
    start: aho_corasick::automaton::StateID,
) -> Box<[bool]> {
    (0..=255u8)
        .map(|b| ac.next_state(aho_corasick::Anchored::No, start, b) == start)
        .collect()
}

/// Walks an unanchored regex DFA over `bytes` (the first at offset `base`) from state `sid`;
/// `free` is the offset before which none of its partial matches can have started. Bytes that
/// keep the start state are skipped with a table lookup (all of a Latin text, for a Chinese
/// regex). `on_match(sid, end, free)` is called for each match state, reached on the byte ending
/// at `end`. Returns the new `(sid, free)`.
#[inline]
pub(crate) fn dfa_loop(
    rd: &RegexDfa,
    bytes: &[u8],
    base: u64,
    mut sid: StateID,
    mut free: u64,
    mut on_match: impl FnMut(StateID, u64, u64),
) -> (StateID, u64) {
    let dfa = &rd.fwd;
    let (st, stay) = (rd.start, &rd.stay[..]);
    let n = bytes.len();
    let mut k = 0;
    while k < n {
        if sid == st {
            let from = k;
            while k < n && stay[bytes[k] as usize] {
                k += 1;
            }
            if k > from && dfa.is_start_state(st) {
                free = base + k as u64;
            }
            if k == n {
                break;
            }
        }
        let byte = bytes[k];
        k += 1;
        let end = base + k as u64;
        sid = dfa.next_state(sid, byte);
        if dfa.is_special_state(sid) {
            if dfa.is_start_state(sid) {
                free = end;
            } else if dfa.is_match_state(sid) {
                on_match(sid, end, free);
            }
        }
    }
    (sid, free)
}

/// The window a match of an unanchored DFA is searched back in, ending at `now` (the offset
/// scanned so far): from the DFA's `free` offset (no partial match began before it), at most
/// `max` bytes back, and one byte of context before. Returns (window start, search start).
pub(crate) fn dfa_window(now: u64, free: u64, max: u64) -> (u64, u64) {
    let lo = free.max(now.saturating_sub(max));
    (lo.saturating_sub(1), lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The depth table agrees with its definition: the longest suffix of the input that is a
    /// prefix of some pattern, for every prefix of texts made of the patterns' bytes.
    #[test]
    fn aho_corasick_depths_are_the_longest_pattern_prefix_ending_here() {
        let patterns = [
            "here ",
            "ELECT",
            "sig=",
            "here we go",
            "ccountKey=",
            "xx",
            "ere",
        ];
        let ac = aho_corasick::dfa::DFA::builder()
            .match_kind(aho_corasick::MatchKind::Standard)
            .ascii_case_insensitive(true)
            .byte_classes(true)
            .build(patterns)
            .unwrap();
        let (depths, shift) = ac_depths(&ac);
        let lower: Vec<String> = patterns.iter().map(|p| p.to_ascii_lowercase()).collect();
        let alphabet: Vec<u8> = lower.concat().into_bytes();
        let mut x: u64 = 7;
        for _ in 0..200 {
            let mut text = Vec::new();
            let mut sid = ac.start_state(aho_corasick::Anchored::No).unwrap();
            for _ in 0..40 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = alphabet[(x >> 33) as usize % alphabet.len()];
                text.push(b);
                sid = ac.next_state(aho_corasick::Anchored::No, sid, b);
                let want = (0..=text.len())
                    .rev()
                    .find(|&n| {
                        let suffix = &text[text.len() - n..];
                        lower.iter().any(|p| p.as_bytes().starts_with(suffix))
                    })
                    .unwrap();
                let got = depths[(sid.as_u32() >> shift) as usize];
                assert_eq!(
                    got as usize,
                    want,
                    "after {:?}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
    }
}
