//! Scanning: the compiled automata ([`Scanner`]) and the walk of one text or stream over them
//! ([`ScanSession`]).
//!
//! Two views of each text are scanned in one pass per chunk, one automaton at a time (a tight
//! loop per automaton, its state in registers):
//!
//! - the **word view** (`word.rs`): the normalizer's output, for language triggers: an
//!   aho-corasick automaton of every language's phrases, anchored DFA walkers for the regexes of
//!   spaced languages, unanchored DFAs for the others;
//! - the **raw view** (`raw.rs`): the caller's bytes, for neutral triggers: one aho-corasick DFA
//!   of phrases and of the anchors of confirmed regexes, and dense DFAs of regexes.
//!
//! Only automaton state ids, a tail of each view (`tail.rs`: the bytes a partial match, a
//! pending anchor or a look-behind can still reach, to map normalized offsets back to the
//! original text and to find where a regex match started), and the rules' scores are carried
//! between chunks, so a trigger split across any chunk boundary is found and a stream's state
//! does not grow with its length. Whole texts are scanned the same way (one chunk), so the two
//! answers agree by construction. `dfa.rs` holds what both views share (the DFA loop, the
//! size-limited builds); `session.rs` the walk of one text or stream, the language decision,
//! scoring and the release offset.

mod clean;
mod dfa;
mod raw;
mod session;
mod tail;
mod word;

pub use dfa::{DFA_SIZE_LIMIT, GROUP_DFA_LIMIT};
pub use session::{ScanSession, ScanStep};
pub use word::PHRASE_DFA_MAX_PATTERNS;

use crate::rules::{CompiledRuleset, LoadError};
use raw::RawAutomata;
use word::WordAutomata;

/// Sizes and counts of what was compiled, for `mistguard check`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScannerStats {
    pub word_phrases: usize,
    pub word_regexes: usize,
    pub raw_phrases: usize,
    pub raw_regexes: usize,
    pub anchors: usize,
    pub word_ac_bytes: usize,
    pub word_ac_kind: &'static str,
    pub word_dfa_bytes: usize,
    pub word_dfa_groups: usize,
    pub word_anchored_bytes: usize,
    pub word_anchored_groups: usize,
    /// Anchored groups spawned by prefix literals, and those literals.
    pub prefixed_groups: usize,
    pub spawn_literals: usize,
    pub raw_dfa_bytes: usize,
    pub raw_dfa_groups: usize,
    pub word_window: usize,
    pub raw_window: usize,
    /// Largest look-behind of a confirmed regex that withholds text: the raw bytes every stream
    /// holds back.
    pub raw_look_behind: usize,
}

/// Build choices of a [`Scanner`] that change its speed, never its results (tests build both
/// ways and compare).
#[derive(Clone, Debug)]
pub struct ScanConfig {
    /// Spawn the walkers of anchored word-view regexes where one of their prefix literals is
    /// found (default), instead of at every word start that their first byte allows.
    pub spawn_literals: bool,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            spawn_literals: true,
        }
    }
}

/// The compiled automata of a ruleset. Immutable and shared by every stream.
pub struct Scanner {
    pub(crate) word: WordAutomata,
    pub(crate) raw: RawAutomata,
    stats: ScannerStats,
}

impl Scanner {
    /// Compiles the automata of a ruleset.
    ///
    /// # Errors
    /// A view whose DFA exceeds [`DFA_SIZE_LIMIT`], or a pattern the DFA builder refuses.
    pub fn build(rs: &CompiledRuleset) -> Result<Scanner, LoadError> {
        Scanner::build_with(rs, &ScanConfig::default())
    }

    /// [`Scanner::build`] with build choices that do not change what is found.
    ///
    /// # Errors
    /// As [`Scanner::build`].
    pub fn build_with(rs: &CompiledRuleset, config: &ScanConfig) -> Result<Scanner, LoadError> {
        let mut stats = ScannerStats::default();
        let word = WordAutomata::build(rs, config, &mut stats)?;
        let raw = RawAutomata::build(rs, &mut stats)?;
        Ok(Scanner { word, raw, stats })
    }

    pub fn stats(&self) -> &ScannerStats {
        &self.stats
    }

    /// The most a stream holds back behind the bytes it has received, once its language is
    /// decided and no hit is pending: the longest partial match of any view (plus the largest
    /// look-behind of a confirmed regex).
    pub fn holdback_bound(&self) -> u64 {
        let word = self.word.ac_max.max(self.word.dfa_max) + 4;
        let raw = (self.raw.ac_max + self.raw.look_behind).max(self.raw.dfa_max);
        word.max(raw)
    }
}
