//! Scanning: the compiled automata ([`Scanner`]) and the per-stream walk over them
//! ([`StreamSession`]).
//!
//! Two views of each text are scanned in one pass per chunk:
//!
//! - the **word view**: the normalizer's output, walked byte by byte through an aho-corasick DFA of
//!   every language's phrases (patterns carry their trigger, hence their language) and a dense DFA
//!   of the word-view regexes;
//! - the **raw view**: the caller's bytes, walked through one dense DFA holding the neutral regexes,
//!   the raw phrases (ASCII case-insensitive) and the anchors of confirmed regexes.
//!
//! Only automaton state ids, a tail of each view (the bytes a partial match, a pending anchor or
//! a look-behind can still reach, to map normalized offsets back to the original text and to find
//! where a regex match started), and the rules' scores are carried between chunks, so a trigger
//! split across any chunk boundary is found and a stream's state does not grow with its length.
//! Whole texts are scanned the same way (one chunk), so the two answers agree by construction.

use crate::action::Action;
use crate::engine::{Engine, Hit, StepResult, Verdict};
use crate::lang::{self, LangSet, NEUTRAL, PROBE_BYTES};
use crate::normalize::{NormSink, Normalizer};
use crate::rules::{syntax_config, Boundary, CompiledRuleset, LoadError, TriggerKind, View};
use crate::score::RuleState;
use aho_corasick::automaton::Automaton as AcAutomaton;
use regex_automata::dfa::{dense, Automaton as DfaAutomaton, StartKind};
use regex_automata::util::primitives::StateID;
use regex_automata::{nfa::thompson, Anchored, Input, MatchKind, PatternID};
use std::sync::Arc;

/// Size limit of one view's DFA (forward), and of its determinization.
pub const DFA_SIZE_LIMIT: usize = 64 << 20;

/// What an aho-corasick pattern of the word view stands for.
#[derive(Clone, Copy, Debug)]
struct AcPattern {
    trigger: u32,
    /// Pattern length in normalized bytes, framing spaces included.
    len: u32,
    lead: u8,
    trail: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RawKind {
    /// A regex: its start is found with the reverse DFA.
    Regex { rev: PatternID },
    /// A phrase of fixed byte length.
    Literal { len: u32 },
    /// An anchor of a confirmed regex: its trigger's `max_len` and `look_behind`, and the span
    /// of anchor starts one confirmation may cover ([`anchor_group_span`], set once the window
    /// is known).
    Anchor {
        len: u32,
        max_len: u32,
        look_behind: u32,
        span: u32,
    },
}

#[derive(Clone, Copy, Debug)]
struct RawPattern {
    trigger: u32,
    kind: RawKind,
}

/// A dense DFA (forward, unanchored, all matches) with its reverse twin for finding starts.
struct RegexDfa {
    fwd: dense::DFA<Vec<u32>>,
    /// Anchored reverse DFA over the regex patterns only, one start per pattern.
    rev: Option<dense::DFA<Vec<u32>>>,
    /// Unanchored start state with no look-behind (stream start).
    start: StateID,
    /// Bytes that keep the DFA in `start` (skipped by [`dfa_loop`]).
    stay: Box<[bool]>,
}

impl RegexDfa {
    fn build_limited(
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

    fn memory_usage(&self) -> usize {
        self.fwd.memory_usage() + self.rev.as_ref().map_or(0, |r| r.memory_usage())
    }

    /// The leftmost start of pattern `rev_pid` matching `window[..end]` exactly up to `end`.
    fn find_start(
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

/// Patterns up to which the word-view phrases use an aho-corasick DFA (~470 MB/s); beyond, a
/// contiguous NFA (several times smaller, slower per byte). The DFA of ~24,000 multilingual
/// phrases took 300 MiB.
pub const PHRASE_DFA_MAX_PATTERNS: usize = 8000;

/// The word-view phrase automaton.
enum Phrases {
    Dfa(aho_corasick::dfa::DFA),
    Nfa(aho_corasick::nfa::contiguous::NFA),
}

impl Phrases {
    fn build(patterns: &[String]) -> Result<Phrases, String> {
        // MISTGUARD_PHRASE_AUTOMATON=dfa|nfa overrides the choice (for measuring both).
        let want_dfa = match std::env::var("MISTGUARD_PHRASE_AUTOMATON").as_deref() {
            Ok("dfa") => true,
            Ok("nfa") => false,
            _ => patterns.len() <= PHRASE_DFA_MAX_PATTERNS,
        };
        if want_dfa {
            aho_corasick::dfa::DFA::builder()
                .match_kind(aho_corasick::MatchKind::Standard)
                .start_kind(aho_corasick::StartKind::Unanchored)
                .prefilter(false)
                .byte_classes(true)
                .build(patterns)
                .map(Phrases::Dfa)
                .map_err(|e| e.to_string())
        } else {
            aho_corasick::nfa::contiguous::NFA::builder()
                .match_kind(aho_corasick::MatchKind::Standard)
                .prefilter(false)
                .byte_classes(true)
                .build(patterns)
                .map(Phrases::Nfa)
                .map_err(|e| e.to_string())
        }
    }

    fn start(&self) -> Result<aho_corasick::automaton::StateID, String> {
        match self {
            Phrases::Dfa(a) => a.start_state(aho_corasick::Anchored::No),
            Phrases::Nfa(a) => a.start_state(aho_corasick::Anchored::No),
        }
        .map_err(|e| e.to_string())
    }

    fn memory_usage(&self) -> usize {
        match self {
            Phrases::Dfa(a) => a.memory_usage(),
            Phrases::Nfa(a) => a.memory_usage(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Phrases::Dfa(_) => "aho-corasick DFA",
            Phrases::Nfa(_) => "aho-corasick contiguous NFA",
        }
    }
}

/// An anchored DFA over word-view regexes, with (pattern id → trigger).
struct AnchoredGroup {
    dfa: dense::DFA<Vec<u32>>,
    triggers: Vec<u32>,
    /// The state after the opening space (where a walker is spawned, see `spawn`).
    after_space: StateID,
    /// Languages of the group's triggers (a group of no applicable language is not walked).
    langs: Vec<crate::lang::LangId>,
}

impl AnchoredGroup {
    fn build(
        patterns: &[String],
        triggers: Vec<u32>,
        limit: usize,
    ) -> Result<AnchoredGroup, String> {
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .start_kind(StartKind::Anchored)
                    .dfa_size_limit(Some(limit))
                    .determinize_size_limit(Some(limit)),
            )
            .syntax(syntax_config(View::Word))
            .thompson(thompson::Config::new().utf8(true))
            .build_many(patterns)
            .map_err(|e| e.to_string())?;
        let start = dfa
            .start_state(
                &regex_automata::util::start::Config::new()
                    .anchored(Anchored::Yes)
                    .look_behind(Some(b' ')),
            )
            .map_err(|e| e.to_string())?;
        let after_space = dfa.next_state(start, b' ');
        Ok(AnchoredGroup {
            dfa,
            triggers,
            after_space,
            langs: Vec::new(),
        })
    }
}

/// A word-view walker: an anchored DFA run started at a space.
#[derive(Clone, Copy, Debug)]
struct Walker {
    group: u16,
    sid: StateID,
    start: u64,
}

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
    /// Largest look-behind of a confirmed regex: the raw bytes every stream keeps.
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
    word_ac: Option<Phrases>,
    word_ac_patterns: Vec<AcPattern>,
    /// Longest word-view phrase: outside the start state, a partial match began at most this far
    /// back.
    word_ac_max: u64,
    word_ac_start: aho_corasick::automaton::StateID,
    /// Bytes that keep the phrase automaton in its start state (skipped without a lookup).
    word_ac_stay: Box<[bool]>,
    /// Word-view regex DFAs: one per rule, split further where a rule's regexes together would
    /// exceed [`GROUP_DFA_LIMIT`]. Each holds (forward pattern id → trigger).
    word_dfas: Vec<(RegexDfa, Vec<u32>)>,
    /// Word-view regexes of languages that separate words: anchored DFAs, walked from every
    /// space (a walker per word start, dropped when it dies). Anchored DFAs stay small where the
    /// unanchored union of many phrase-like regexes explodes.
    word_anchored: Vec<AnchoredGroup>,
    /// For each byte, the anchored groups (bit per group) whose walker survives a space followed
    /// by that byte: the only walkers spawned there. Groups spawned by literals are not here.
    spawn: Box<[u64]>,
    /// Prefix literals in the phrase automaton (pattern `SPAWN | i`): the group whose walker a
    /// match of literal `i` spawns, and the walker's state after the literal.
    spawn_lits: Vec<(u16, StateID)>,
    /// Raw-view DFAs: one per rule, split further where a rule's patterns together would exceed
    /// [`GROUP_DFA_LIMIT`]. Each holds (forward pattern id → what it stands for).
    raw_dfas: Vec<(RegexDfa, Vec<RawPattern>)>,
    /// Raw phrases and anchors: an ASCII case-insensitive aho-corasick DFA (anchors are then
    /// checked case-sensitively). Literals in a dense DFA with all-matches semantics determinize
    /// slowly; aho-corasick builds them in milliseconds.
    raw_ac: Option<aho_corasick::dfa::DFA>,
    raw_ac_patterns: Vec<(RawPattern, Box<[u8]>)>,
    raw_ac_max: u64,
    /// Depth of each raw phrase automaton state (the length of the partial match it stands
    /// for), by state id shifted right by the second field: where a partial anchor began,
    /// looked up once per chunk.
    raw_ac_depths: (Vec<u8>, u32),
    /// Largest `look_behind` of the confirmed regexes: a match can start this far before its
    /// anchor, so a stream holds back that much more.
    raw_look_behind: u64,
    raw_ac_start: aho_corasick::automaton::StateID,
    /// Bytes that keep the raw phrase automaton in its start state.
    raw_ac_stay: Box<[bool]>,
    /// Confirmation regexes of anchored triggers, by trigger index.
    confirm: Vec<Option<regex_automata::meta::Regex>>,
    /// The most bytes a view's tail may keep (powers of two): what the longest match, or a
    /// confirmation window, reaches back. A stream keeps less, see [`Tail`].
    word_window: usize,
    raw_window: usize,
    /// Longest match of the word-view regex DFA and of the raw DFA.
    word_dfa_max: u64,
    raw_dfa_max: u64,
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
        let fail = |what: &str, e: String| LoadError {
            file: rs.source.clone(),
            line: None,
            message: format!("{what}: {e}"),
        };
        let mut stats = ScannerStats::default();
        // Word view.
        let mut ac_pats: Vec<String> = Vec::new();
        let mut word_ac_patterns = Vec::new();
        let mut word_re: Vec<(usize, u32, String)> = Vec::new();
        let mut word_max = 8usize;
        let mut word_dfa_max = 0usize;
        let mut raw_dfa_max = 0usize;
        // Raw view.
        // (rule, forward pattern, what it stands for); reverse ids are assigned per group.
        let mut raw: Vec<(usize, String, RawPattern)> = Vec::new();
        let mut raw_lits: Vec<(RawPattern, Box<[u8]>)> = Vec::new();
        let mut confirm: Vec<Option<regex_automata::meta::Regex>> = vec![None; rs.triggers.len()];
        let mut raw_max = 8usize;
        for (ti, t) in rs.triggers.iter().enumerate() {
            let ti = ti as u32;
            match (&t.kind, t.view) {
                (TriggerKind::Phrases(phrases), View::Word) => {
                    for p in phrases {
                        let (lead, trail) = match t.boundary {
                            Boundary::Word => (1, 1),
                            Boundary::Start => (1, 0),
                            Boundary::End => (0, 1),
                            Boundary::None => (0, 0),
                        };
                        let framed = format!("{}{}{}", " ".repeat(lead), p, " ".repeat(trail));
                        word_max = word_max.max(framed.len());
                        word_ac_patterns.push(AcPattern {
                            trigger: ti,
                            len: framed.len() as u32,
                            lead: lead as u8,
                            trail: trail as u8,
                        });
                        ac_pats.push(framed);
                        stats.word_phrases += 1;
                    }
                }
                (TriggerKind::Regex { pattern, max_len }, View::Word) => {
                    word_max = word_max.max(*max_len);
                    word_dfa_max = word_dfa_max.max(*max_len);
                    word_re.push((t.rule, ti, pattern.clone()));
                    stats.word_regexes += 1;
                }
                (TriggerKind::Phrases(phrases), View::Raw) => {
                    for p in phrases {
                        raw_max = raw_max.max(p.len());
                        raw_dfa_max = raw_dfa_max.max(p.len());
                        raw_lits.push((
                            RawPattern {
                                trigger: ti,
                                kind: RawKind::Literal {
                                    len: p.len() as u32,
                                },
                            },
                            p.as_bytes().into(),
                        ));
                        stats.raw_phrases += 1;
                    }
                }
                (TriggerKind::Regex { pattern, max_len }, View::Raw) => {
                    raw_max = raw_max.max(*max_len);
                    raw_dfa_max = raw_dfa_max.max(*max_len);
                    raw.push((
                        t.rule,
                        pattern.clone(),
                        RawPattern {
                            trigger: ti,
                            kind: RawKind::Regex {
                                rev: PatternID::ZERO,
                            },
                        },
                    ));
                    stats.raw_regexes += 1;
                }
                (
                    TriggerKind::Anchored {
                        anchors,
                        pattern,
                        max_len,
                        look_behind,
                    },
                    _,
                ) => {
                    raw_max = raw_max.max(max_len + look_behind + 2);
                    for a in anchors {
                        raw_dfa_max = raw_dfa_max.max(a.len());
                        raw_lits.push((
                            RawPattern {
                                trigger: ti,
                                kind: RawKind::Anchor {
                                    len: a.len() as u32,
                                    max_len: *max_len as u32,
                                    look_behind: *look_behind as u32,
                                    span: 1,
                                },
                            },
                            a.as_bytes().into(),
                        ));
                        stats.anchors += 1;
                    }
                    let re = regex_automata::meta::Regex::builder()
                        .syntax(syntax_config(View::Raw).unicode(true))
                        .build(pattern)
                        .map_err(|e| LoadError {
                            file: t.file.to_string(),
                            line: Some(t.line),
                            message: format!("regex `{pattern}`: {e}"),
                        })?;
                    confirm[ti as usize] = Some(re);
                }
            }
        }
        // Regexes of languages with spaces start at a word: anchored walkers. The others (zh, ja,
        // th) can start anywhere: unanchored DFAs, one per rule.
        let spaced = |ti: u32| {
            let l = rs.triggers[ti as usize].lang;
            l == NEUTRAL || lang::LANGS[l as usize].spaced
        };
        let anchored: Vec<(u32, String)> = word_re
            .iter()
            .filter(|r| spaced(r.1))
            .map(|r| {
                let p = if r.2.starts_with(' ') {
                    r.2.clone()
                } else {
                    format!(" (?:{})", r.2)
                };
                (r.1, p)
            })
            .collect();
        let trace = std::env::var_os("MISTGUARD_TRACE_BUILD").is_some();
        let t0 = std::time::Instant::now();
        let mut word_anchored = Vec::new();
        // One bucket per language of the Latin script (English with the neutral set), one for the
        // other scripts: groups of one language can be skipped once the text's language is known,
        // and regexes of different languages, kept apart, do not multiply each other's states.
        let bucket = |ti: u32| {
            let l = rs.triggers[ti as usize].lang;
            if l == NEUTRAL || l == lang::ENGLISH {
                0
            } else if lang::LANGS[l as usize].writing == lang::Writing::Latin {
                1 + l as usize
            } else {
                usize::MAX
            }
        };
        let mut buckets: Vec<usize> = anchored.iter().map(|a| bucket(a.0)).collect();
        buckets.sort();
        buckets.dedup();
        // Within a bucket, regexes whose matches all begin with one of a few prefix literals are
        // grouped apart: their walkers are spawned where the phrase automaton finds a literal,
        // not at every word start.
        let literals: Vec<Option<Vec<Vec<u8>>>> = anchored
            .iter()
            .map(|a| prefix_literals(&a.1).filter(|_| config.spawn_literals))
            .collect();
        for b in buckets {
            for prefixed in [true, false] {
                let part: Vec<(u32, String)> = anchored
                    .iter()
                    .zip(&literals)
                    .filter(|(a, l)| bucket(a.0) == b && l.is_some() == prefixed)
                    .map(|(a, _)| a.clone())
                    .collect();
                if !part.is_empty() {
                    build_anchored(rs, &part, &mut word_anchored)?;
                }
            }
        }
        if word_anchored.len() > 64 {
            return Err(fail(
                "word-view regexes",
                format!(
                    "{} anchored DFA groups (at most 64): merge or shorten regexes",
                    word_anchored.len()
                ),
            ));
        }
        for g in &mut word_anchored {
            let mut langs: Vec<crate::lang::LangId> = g
                .triggers
                .iter()
                .map(|&t| rs.triggers[t as usize].lang)
                .collect();
            langs.sort();
            langs.dedup();
            g.langs = langs;
        }
        // Spawn literals of each group whose every pattern has them; a group where one does not
        // walk cleanly is spawned at word starts instead.
        let literal_of: std::collections::HashMap<u32, &Vec<Vec<u8>>> = anchored
            .iter()
            .zip(&literals)
            .filter_map(|(a, l)| l.as_ref().map(|l| (a.0, l)))
            .collect();
        let mut spawn_lits: Vec<(u16, StateID)> = Vec::new();
        let mut prefixed_groups = 0u64;
        for (gi, g) in word_anchored.iter().enumerate() {
            // Groups are built from all-prefixed or all-unprefixed parts (above).
            let Some(lits) = g
                .triggers
                .iter()
                .map(|t| literal_of.get(t).copied())
                .collect::<Option<Vec<_>>>()
            else {
                continue;
            };
            let Some(walked) = walk_literals(g, lits.into_iter().flatten().cloned()) else {
                continue;
            };
            prefixed_groups |= 1 << gi;
            for (lit, sid) in walked {
                word_ac_patterns.push(AcPattern {
                    trigger: SPAWN | spawn_lits.len() as u32,
                    len: lit.len() as u32,
                    lead: 0,
                    trail: 0,
                });
                ac_pats.push(String::from_utf8(lit).expect("literal prefixes are UTF-8"));
                spawn_lits.push((gi as u16, sid));
            }
        }
        stats.spawn_literals = spawn_lits.len();
        stats.prefixed_groups = prefixed_groups.count_ones() as usize;
        let mut spawn = vec![0u64; 256].into_boxed_slice();
        for (gi, g) in word_anchored.iter().enumerate() {
            if prefixed_groups & (1 << gi) != 0 {
                continue;
            }
            for (b, m) in spawn.iter_mut().enumerate() {
                if !g
                    .dfa
                    .is_dead_state(g.dfa.next_state(g.after_space, b as u8))
                {
                    *m |= 1 << gi;
                }
            }
        }
        if trace {
            eprintln!(
                "anchored word DFAs: {} patterns, {} groups, {:?}",
                anchored.len(),
                word_anchored.len(),
                t0.elapsed()
            );
        }
        let word_ac_max = ac_pats.iter().map(|p| p.len()).max().unwrap_or(0) as u64;
        let word_ac = if ac_pats.is_empty() {
            None
        } else {
            Some(Phrases::build(&ac_pats).map_err(|e| fail("word-view phrases", e))?)
        };
        let word_ac_start = match &word_ac {
            Some(ac) => ac.start().map_err(|e| fail("word-view phrases", e))?,
            None => aho_corasick::automaton::StateID::ZERO,
        };
        let mut word_dfas = Vec::new();
        let mut rules: Vec<usize> = word_re
            .iter()
            .filter(|r| !spaced(r.1))
            .map(|r| r.0)
            .collect();
        rules.dedup();
        for rule in rules {
            let group: Vec<(u32, String)> = word_re
                .iter()
                .filter(|r| r.0 == rule && !spaced(r.1))
                .map(|r| (r.1, r.2.clone()))
                .collect();
            build_groups(rs, View::Word, &group, &mut word_dfas)?;
            if trace {
                eprintln!(
                    "unanchored word DFA for {}: {} patterns, {:?}",
                    rs.rules[rule].id,
                    group.len(),
                    t0.elapsed()
                );
            }
        }
        if trace {
            eprintln!("word automata done {:?}", t0.elapsed());
        }
        let raw_ac = if raw_lits.is_empty() {
            None
        } else {
            Some(
                aho_corasick::dfa::DFA::builder()
                    .match_kind(aho_corasick::MatchKind::Standard)
                    .start_kind(aho_corasick::StartKind::Unanchored)
                    .ascii_case_insensitive(true)
                    .prefilter(false)
                    .byte_classes(true)
                    .build(raw_lits.iter().map(|l| &l.1))
                    .map_err(|e| fail("raw-view phrases", e.to_string()))?,
            )
        };
        let raw_ac_max = raw_lits.iter().map(|l| l.1.len()).max().unwrap_or(0) as u64;
        let raw_ac_depths = match &raw_ac {
            Some(ac) => ac_depths(ac),
            None => (Vec::new(), 0),
        };
        let raw_look_behind = rs
            .triggers
            .iter()
            .map(|t| match &t.kind {
                TriggerKind::Anchored { look_behind, .. } => *look_behind as u64,
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        let raw_ac_start = match &raw_ac {
            Some(ac) => ac
                .start_state(aho_corasick::Anchored::No)
                .map_err(|e| fail("raw-view phrases", e.to_string()))?,
            None => aho_corasick::automaton::StateID::ZERO,
        };
        let mut raw_dfas = Vec::new();
        let mut raw_rules: Vec<usize> = raw.iter().map(|r| r.0).collect();
        raw_rules.sort();
        raw_rules.dedup();
        for rule in raw_rules {
            let group: Vec<(String, RawPattern)> = raw
                .iter()
                .filter(|r| r.0 == rule)
                .map(|r| (r.1.clone(), r.2))
                .collect();
            build_raw_groups(rs, &group, &mut raw_dfas)?;
            if trace {
                eprintln!(
                    "raw DFAs for {}: {} patterns, {:?}",
                    rs.rules[rule].id,
                    group.len(),
                    t0.elapsed()
                );
            }
        }
        if trace {
            eprintln!("raw DFA done {:?}", t0.elapsed());
        }
        let word_ac_stay = match &word_ac {
            Some(Phrases::Dfa(a)) => ac_stay(a, word_ac_start),
            Some(Phrases::Nfa(a)) => ac_stay(a, word_ac_start),
            None => vec![true; 256].into_boxed_slice(),
        };
        let raw_ac_stay = match &raw_ac {
            Some(a) => ac_stay(a, raw_ac_start),
            None => vec![true; 256].into_boxed_slice(),
        };
        if trace {
            eprintln!(
                "start-state bytes: word phrases {}, raw phrases {}",
                word_ac_stay.iter().filter(|s| **s).count(),
                raw_ac_stay.iter().filter(|s| **s).count()
            );
        }
        stats.word_ac_bytes = word_ac.as_ref().map_or(0, |a| a.memory_usage());
        stats.word_ac_kind = word_ac.as_ref().map_or("none", |a| a.kind());
        stats.word_dfa_bytes = word_dfas.iter().map(|d| d.0.memory_usage()).sum();
        stats.word_dfa_groups = word_dfas.len();
        stats.word_anchored_bytes = word_anchored.iter().map(|g| g.dfa.memory_usage()).sum();
        stats.word_anchored_groups = word_anchored.len();
        stats.raw_dfa_bytes = raw_dfas.iter().map(|d| d.0.memory_usage()).sum::<usize>()
            + raw_ac.as_ref().map_or(0, |a| a.memory_usage());
        stats.raw_dfa_groups = raw_dfas.len();
        let word_window = (word_max + 2).next_power_of_two();
        let raw_window = (raw_max + 2).next_power_of_two();
        for (p, _) in &mut raw_lits {
            if let RawKind::Anchor {
                max_len,
                look_behind,
                span,
                ..
            } = &mut p.kind
            {
                *span = anchor_group_span(raw_window, *max_len as u64, *look_behind as u64) as u32;
            }
        }
        stats.word_window = word_window;
        stats.raw_window = raw_window;
        stats.raw_look_behind = raw_look_behind as usize;
        Ok(Scanner {
            word_ac,
            word_ac_patterns,
            word_ac_max,
            word_ac_start,
            word_ac_stay,
            word_dfas,
            word_anchored,
            spawn,
            spawn_lits,
            raw_dfas,
            raw_ac,
            raw_ac_patterns: raw_lits,
            raw_ac_max,
            raw_ac_depths,
            raw_look_behind,
            raw_ac_start,
            raw_ac_stay,
            confirm,
            word_window,
            raw_window,
            word_dfa_max: word_dfa_max as u64 + 1,
            raw_dfa_max: raw_dfa_max as u64 + 1,
            stats,
        })
    }

    pub fn stats(&self) -> &ScannerStats {
        &self.stats
    }

    /// The length of the partial match that raw phrase automaton state `sid` stands for.
    fn raw_ac_depth(&self, sid: aho_corasick::automaton::StateID) -> u64 {
        let (depths, shift) = &self.raw_ac_depths;
        match depths.get((sid.as_u32() >> shift) as usize) {
            Some(&d) if d < u8::MAX => d as u64,
            _ => self.raw_ac_max,
        }
    }

    /// The most a stream holds back behind the bytes it has received, once its language is
    /// decided and no hit is pending: the longest partial match of any view (plus the largest
    /// look-behind of a confirmed regex).
    pub fn holdback_bound(&self) -> u64 {
        let word = self.word_ac_max.max(self.word_dfa_max) + 4;
        let raw = (self.raw_ac_max + self.raw_look_behind).max(self.raw_dfa_max);
        word.max(raw)
    }
}

/// Size limit of one word-view regex group's DFA: a rule whose regexes exceed it together is
/// split into several DFAs (each costs one more table lookup per byte).
pub const GROUP_DFA_LIMIT: usize = 16 << 20;

/// Builds automata over `patterns` with `build`, halving the set until each part fits under
/// [`GROUP_DFA_LIMIT`]. A single pattern that does not fit is refused with its trigger's place;
/// `trigger` names the trigger of a pattern, `hint` says what to do about it.
fn build_halving<P, G>(
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

const SHORTEN: &str = "shorten its counted repetitions or alternations";

/// Unanchored DFAs (with reverse DFAs for match starts) over word-view regexes.
fn build_groups(
    rs: &CompiledRuleset,
    view: View,
    patterns: &[(u32, String)],
    out: &mut Vec<(RegexDfa, Vec<u32>)>,
) -> Result<(), LoadError> {
    let build = |part: &[(u32, String)]| {
        let res: Vec<String> = part.iter().map(|p| p.1.clone()).collect();
        RegexDfa::build_limited(view, &res, &res, GROUP_DFA_LIMIT)
            .map(|d| (d, part.iter().map(|p| p.0).collect()))
    };
    build_halving(rs, patterns, &|p| p.0, &build, SHORTEN, out)
}

/// Raw-view DFAs; reverse pattern ids are numbered per group.
fn build_raw_groups(
    rs: &CompiledRuleset,
    patterns: &[(String, RawPattern)],
    out: &mut Vec<(RegexDfa, Vec<RawPattern>)>,
) -> Result<(), LoadError> {
    let build = |part: &[(String, RawPattern)]| {
        let fwd: Vec<String> = part.iter().map(|p| p.0.clone()).collect();
        let mut rev = Vec::new();
        let mut kinds = Vec::new();
        for (pat, p) in part {
            let mut p = *p;
            if let RawKind::Regex { .. } = p.kind {
                p.kind = RawKind::Regex {
                    rev: PatternID::new_unchecked(rev.len()),
                };
                rev.push(pat.clone());
            }
            kinds.push(p);
        }
        RegexDfa::build_limited(View::Raw, &fwd, &rev, GROUP_DFA_LIMIT).map(|d| (d, kinds))
    };
    build_halving(
        rs,
        patterns,
        &|p| p.1.trigger,
        &build,
        "use anchors + regex for long token shapes",
        out,
    )
}

/// Anchored DFAs over word-view regexes of spaced languages.
fn build_anchored(
    rs: &CompiledRuleset,
    patterns: &[(u32, String)],
    out: &mut Vec<AnchoredGroup>,
) -> Result<(), LoadError> {
    if std::env::var("MISTGUARD_TRACE_BUILD").as_deref() == Ok("2") {
        for (t, re) in patterns {
            let size = AnchoredGroup::build(std::slice::from_ref(re), vec![*t], GROUP_DFA_LIMIT)
                .map(|g| g.dfa.memory_usage() / 1024);
            eprintln!("anchored {} {:?} KiB", rs.triggers[*t as usize].id, size);
        }
    }
    let build = |part: &[(u32, String)]| {
        let res: Vec<String> = part.iter().map(|p| p.1.clone()).collect();
        AnchoredGroup::build(&res, part.iter().map(|p| p.0).collect(), GROUP_DFA_LIMIT)
    };
    build_halving(rs, patterns, &|p| p.0, &build, SHORTEN, out)
}

/// An `AcPattern::trigger` with this bit set is a walker's spawn literal (index in the low bits).
const SPAWN: u32 = 1 << 31;

/// Longest spawn literal kept (bytes, opening space included): longer ones are cut, which keeps
/// the phrase automaton small and changes nothing but how often a walker is spawned in vain.
const SPAWN_LITERAL_BYTES: usize = 6;

/// The literals every match of an anchored word-view pattern begins with (cut to
/// [`SPAWN_LITERAL_BYTES`]), or None when there is no small set of them of three bytes or more.
fn prefix_literals(pattern: &str) -> Option<Vec<Vec<u8>>> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};
    let hir = regex_syntax::ParserBuilder::new()
        .nest_limit(64)
        .build()
        .parse(pattern)
        .ok()?;
    let mut seq = Extractor::new()
        .kind(ExtractKind::Prefix)
        .limit_class(20)
        .limit_total(2000)
        .extract(&hir);
    seq.keep_first_bytes(SPAWN_LITERAL_BYTES);
    seq.dedup();
    let mut lits: Vec<Vec<u8>> = seq
        .literals()?
        .iter()
        .map(|l| {
            // The cut may split a character: keep whole characters.
            let mut l = l.as_bytes().to_vec();
            while std::str::from_utf8(&l).is_err() {
                l.pop();
            }
            l
        })
        .collect();
    lits.sort();
    lits.dedup();
    if lits.is_empty() || lits.iter().any(|l| l.len() < 3 || l[0] != b' ') {
        return None;
    }
    Some(lits)
}

/// Walks a group's literals from its after-space state: each with the state it leaves a walker
/// in. A literal is cut before a byte that would reach a match state (the walker must take that
/// step itself, to report the match) and dropped when another literal is a prefix of it. None
/// when a literal cannot be cut to two bytes or more, or dies (the group is then spawned at word
/// starts).
fn walk_literals(
    g: &AnchoredGroup,
    lits: impl Iterator<Item = Vec<u8>>,
) -> Option<Vec<(Vec<u8>, StateID)>> {
    let mut walked = Vec::new();
    for mut lit in lits {
        let mut sid = g.after_space;
        for i in 1..lit.len() {
            let next = g.dfa.next_state(sid, lit[i]);
            if g.dfa.is_dead_state(next) {
                return None;
            }
            if g.dfa.is_match_state(next) {
                if i < 2 {
                    return None;
                }
                lit.truncate(i);
                break;
            }
            sid = next;
        }
        walked.push((lit, sid));
    }
    walked.sort();
    walked.dedup();
    let mut out: Vec<(Vec<u8>, StateID)> = Vec::with_capacity(walked.len());
    for (lit, sid) in walked {
        // Sorted: whatever lies between a literal and one it is a prefix of also starts with
        // it (and was dropped), so only the last literal kept can be a prefix.
        if out.last().is_some_and(|k| lit.starts_with(&k.0)) {
            continue;
        }
        out.push((lit, sid));
    }
    Some(out)
}

/// A hit before its rule's score is known.
type Found = crate::score::Match;

/// Anchors of one confirmed regex that start within [`ANCHOR_GROUP`] bytes of the first,
/// waiting for enough bytes after the last: one confirmation covers them all. (Digits anchor the
/// phone, card and IBAN shapes; one confirmation per digit made numeric text twenty times slower
/// to scan than prose.)
#[derive(Clone, Copy, Debug)]
struct PendingAnchor {
    trigger: u32,
    /// Start of the group's first anchor (offsets fit in 32 bits: a stream is limited to 4 GiB).
    first_at: u32,
    /// Offset at which the window after the last anchor is complete (at most `u32::MAX`: then
    /// at the end of input).
    due_at: u32,
    /// The trigger's `look_behind` (read for every pending anchor at every chunk).
    look_behind: u32,
    /// Bit `i`: an anchor starts at `first + i`.
    starts: u64,
}

/// An offset kept in 32 bits; beyond (a window reaching past the 4 GiB a stream may have) it
/// stands for the end of input.
fn clamp32(x: u64) -> u32 {
    x.min(u32::MAX as u64) as u32
}

/// Most span of the anchor starts one confirmation covers; less for a trigger whose window
/// leaves less room in the raw window (see [`anchor_group_span`]).
const ANCHOR_GROUP: u64 = 64;

/// The span of anchor starts one confirmation of a trigger may cover, so that its window (the
/// look-behind, the span, `max_len` and a byte of context on each side) still fits the window.
fn anchor_group_span(ring: usize, max_len: u64, look_behind: u64) -> u64 {
    (ring as u64)
        .saturating_sub(max_len + look_behind + 2)
        .clamp(1, ANCHOR_GROUP)
}

impl PendingAnchor {
    fn first(&self) -> u64 {
        self.first_at as u64
    }

    fn due(&self) -> u64 {
        self.due_at as u64
    }

    fn last(&self) -> u64 {
        self.first() + 63 - u64::from(self.starts.leading_zeros())
    }

    /// Whether an anchor of the group starts in `s..e`.
    fn starts_in(&self, s: u64, e: u64) -> bool {
        let lo = s.max(self.first());
        let hi = e.min(self.first() + ANCHOR_GROUP);
        if lo >= hi {
            return false;
        }
        let (i, n) = (lo - self.first(), hi - lo);
        let mask = if n >= 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << i
        };
        self.starts & mask != 0
    }
}

enum LangState {
    Decided(LangSet),
    Probing(Box<Probe>),
}

/// A stream whose language is not decided yet: its first bytes, and the language triggers found
/// meanwhile (accepted or dropped once it is decided).
#[derive(Default)]
struct Probe {
    buf: String,
    waiting: Vec<Found>,
}

/// The state of one stream: automaton states, tails, scores. See the module docs.
pub struct StreamSession {
    engine: Arc<Engine>,
    // Raw view.
    raw_pos: u64,
    /// State of each raw DFA, and the offset before which none of its partial matches started.
    raw: Box<[DfaAt]>,
    raw_ac_sid: aho_corasick::automaton::StateID,
    raw_tail: Tail<u8>,
    /// [`raw_oldest`](Self::raw_oldest) after the last chunk.
    raw_oldest: u64,
    anchors: Vec<PendingAnchor>,
    // Word view.
    norm: Normalizer,
    word_pos: u64,
    ac_sid: aho_corasick::automaton::StateID,
    /// Offset at which the phrase automaton was last in its start state.
    ac_free: u64,
    /// State of each word-view regex DFA, and the offset after which none of its partial matches
    /// can have started.
    wdfa: Box<[DfaAt]>,
    /// Live anchored walkers, oldest first.
    walkers: Vec<Walker>,
    /// A space whose walkers are spawned when the next byte shows which can live
    /// ([`NO_SPACE`]: none).
    pending_space: u64,
    /// Anchored groups (bit per group) that hold a trigger of an applicable language.
    active_groups: u64,
    word_tail: Tail<WordCell>,
    /// [`word_oldest`](Self::word_oldest) after the last batch.
    word_oldest: u64,
    // Language, scores, results.
    lang: LangState,
    /// Score of each rule with a hit so far, by rule index (ascending): a fresh stream holds none.
    rules: Vec<(usize, RuleState)>,
    action: Action,
    /// What was reported, from the first hit on (a stream without hits holds none of it).
    reported: Option<Box<Reported>>,
    keep_hits: bool,
    /// Chunks in a row that left no pending anchor and no walker: at [`TAIL_IDLE_UPDATES`] the
    /// room of both lists is given back.
    lists_idle: u8,
    released: u64,
    /// `feed_last` was called: no more chunks may come.
    fed_last: bool,
    finished: bool,
}

/// What a stream keeps of the hits it reported.
#[derive(Default)]
struct Reported {
    /// Every hit reported, for [`StreamSession::verdict`], up to [`MAX_KEPT_HITS`] (not kept
    /// after [`StreamSession::discard_verdict_hits`]).
    hits: Vec<Found>,
    /// Each distinct trigger reported (what the message is made of), by index.
    distinct: Vec<u32>,
    /// The message of the last step (the engine's shared copy when the bool is true), and what
    /// it was made from.
    message: Option<(Arc<str>, bool)>,
    message_key: Option<(Action, Option<&'static str>, usize)>,
}

/// A list of pending anchors or walkers, empty and without room, gets room for two (not the
/// four a `Vec` takes at first): most streams hold one or two at a time.
fn small_room<T>(v: &mut Vec<T>) {
    if v.capacity() == 0 {
        v.reserve_exact(2);
    }
}

/// Decides the windows of rule `rule` (state `st`) that end before `floor`; its action if it
/// fired (its hits are then in `out`).
fn settle_rule(
    engine: &Engine,
    rule: usize,
    st: &mut RuleState,
    floor: u64,
    out: &mut Vec<Found>,
) -> Option<Action> {
    let r = &engine.rules.rules[rule];
    let triggers = &engine.rules.triggers;
    st.settle(
        floor,
        r.window,
        r.threshold,
        |t| triggers[t as usize].weight,
        out,
    )
    .then_some(r.action)
}

/// `pending_space` when no space is pending.
const NO_SPACE: u64 = u64::MAX;

/// The pending space's offset, if one is pending; none is after.
fn take_space(at: &mut u64) -> Option<u64> {
    Some(std::mem::replace(at, NO_SPACE)).filter(|&a| a != NO_SPACE)
}

/// A DFA's state in a stream, and its `free` offset (see [`dfa_loop`]); offsets fit in 32 bits
/// (a stream is limited to 4 GiB).
type DfaAt = (StateID, u32);

/// Most hits a stream keeps for its final verdict.
pub const MAX_KEPT_HITS: usize = 4096;

impl StreamSession {
    pub fn new(engine: Arc<Engine>, opts: &crate::engine::ClassifyOptions) -> StreamSession {
        let sc = &engine.scanner;
        let lang = match opts.lang_hint.as_deref().and_then(LangSet::from_hint) {
            Some(set) => LangState::Decided(set),
            None => LangState::Probing(Box::default()),
        };
        let raw = sc.raw_dfas.iter().map(|d| (d.0.start, 0)).collect();
        let wdfa = sc.word_dfas.iter().map(|d| (d.0.start, 0)).collect();
        let mut s = StreamSession {
            raw_pos: 0,
            raw,
            raw_ac_sid: sc.raw_ac_start,
            raw_tail: Tail::default(),
            raw_oldest: 0,
            anchors: Vec::new(),
            norm: Normalizer::new(),
            word_pos: 0,
            ac_sid: sc.word_ac_start,
            ac_free: 0,
            wdfa,
            walkers: Vec::new(),
            pending_space: NO_SPACE,
            active_groups: u64::MAX,
            word_tail: Tail::default(),
            word_oldest: 0,
            lang,
            rules: Vec::new(),
            action: Action::Allow,
            keep_hits: true,
            lists_idle: 0,
            reported: None,
            released: 0,
            fed_last: false,
            finished: false,
            engine,
        };
        s.update_active_groups();
        s
    }

    /// Stops keeping every reported hit for [`StreamSession::verdict`], whose `hits` (and
    /// sanitized text) then hold only what was reported before. For a caller that consumes each
    /// step's hits as they come (the daemon's streams): the stream's state then stays bounded by
    /// its automata and scores, not by how many hits it has reported.
    pub fn discard_verdict_hits(&mut self) {
        self.keep_hits = false;
        if let Some(r) = &mut self.reported {
            r.hits = Vec::new();
        }
    }

    /// Bytes fed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.raw_pos
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The verdict so far.
    pub fn action(&self) -> Action {
        self.action
    }

    /// Bytes of state this stream holds (the struct, its tails and its vectors), for the budget
    /// figure in the benchmarks: the sum of [`state_parts`](Self::state_parts).
    pub fn state_bytes(&self) -> usize {
        self.state_parts().iter().map(|p| p.1).sum()
    }

    /// What [`state_bytes`](Self::state_bytes) counts, part by part (heap parts by capacity).
    pub fn state_parts(&self) -> Vec<(&'static str, usize)> {
        use std::mem::size_of;
        vec![
            ("struct", size_of::<Self>()),
            ("raw tail", self.raw_tail.bytes()),
            ("word tail", self.word_tail.bytes()),
            (
                "DFA states",
                (self.wdfa.len() + self.raw.len()) * size_of::<DfaAt>(),
            ),
            ("walkers", self.walkers.capacity() * size_of::<Walker>()),
            (
                "pending anchors",
                self.anchors.capacity() * size_of::<PendingAnchor>(),
            ),
            (
                "language",
                match &self.lang {
                    LangState::Probing(p) => {
                        size_of::<Probe>()
                            + p.buf.capacity()
                            + p.waiting.capacity() * size_of::<Found>()
                    }
                    LangState::Decided(_) => 0,
                },
            ),
            (
                "rule scores",
                self.rules.capacity() * size_of::<(usize, RuleState)>()
                    + self
                        .rules
                        .iter()
                        .map(|(_, r)| {
                            r.seen.capacity() * 4 + r.held.capacity() * size_of::<Found>()
                        })
                        .sum::<usize>(),
            ),
            (
                "verdict hits",
                self.reported
                    .as_ref()
                    .map_or(0, |r| r.hits.capacity() * size_of::<Found>()),
            ),
            (
                "message",
                self.reported.as_ref().map_or(0, |r| {
                    size_of::<Reported>()
                        + r.distinct.capacity() * 4
                        + r.message
                            .as_ref()
                            .map_or(0, |(m, shared)| if *shared { 0 } else { m.len() })
                }),
            ),
        ]
    }

    /// Scans one chunk.
    ///
    /// # Panics
    /// If the stream grows past 4 GiB (offsets are kept in 32 bits; the daemon caps streams far
    /// lower).
    pub fn feed(&mut self, chunk: &str) -> StepResult {
        self.feed_chunk(chunk, false)
    }

    /// Scans the last chunk of the input (call [`finish`](Self::finish) after it). The answer is
    /// the same as [`feed`](Self::feed)'s; knowing no more text follows lets an input shorter than
    /// the language probe have its language decided before the scan (the probe is then the whole
    /// input either way), so the walker groups of languages that cannot apply are not walked.
    /// Short prompts are most of what a daemon sees.
    pub fn feed_last(&mut self, chunk: &str) -> StepResult {
        self.feed_chunk(chunk, true)
    }

    fn feed_chunk(&mut self, chunk: &str, last: bool) -> StepResult {
        assert!(!self.fed_last, "feed after feed_last");
        self.fed_last = last;
        assert!(!self.finished, "feed after finish");
        assert!(
            self.raw_pos + chunk.len() as u64 <= u32::MAX as u64,
            "a stream is limited to 4 GiB"
        );
        let engine = self.engine.clone();
        let mut found = Vec::new();
        if let LangState::Probing(p) = &mut self.lang {
            let buf = &mut p.buf;
            let room = PROBE_BYTES.saturating_sub(buf.len());
            let mut take = room.min(chunk.len());
            while !chunk.is_char_boundary(take) {
                take -= 1;
            }
            buf.push_str(&chunk[..take]);
        }
        // The language depends on the first PROBE_BYTES only: decide it before scanning the
        // chunk that completes them, so the scan already skips what cannot apply.
        if matches!(self.lang, LangState::Probing(_))
            && (last || self.raw_pos + chunk.len() as u64 >= PROBE_BYTES as u64)
        {
            found = self.decide_language();
        }
        self.scan_raw(&engine, chunk.as_bytes(), &mut found);
        // The word view goes through the normalizer in slices, so the batch buffer stays small
        // (a few KiB per thread) whatever the chunk size.
        BATCH.with(|b| {
            let mut b = b.borrow_mut();
            let mut rest = chunk;
            while !rest.is_empty() {
                let mut cut = rest.len().min(BATCH_INPUT);
                while !rest.is_char_boundary(cut) {
                    cut -= 1;
                }
                b.clear();
                self.norm.feed(&rest[..cut], &mut *b);
                self.scan_words(&engine, &b, &mut found);
                rest = &rest[cut..];
            }
        });
        let mut out = Vec::new();
        self.accept_all(&engine, found, &mut out);
        if self.anchors.is_empty() && self.walkers.is_empty() {
            self.lists_idle = self.lists_idle.saturating_add(1);
            if u32::from(self.lists_idle) >= TAIL_IDLE_UPDATES
                && self.anchors.capacity() + self.walkers.capacity() > 0
            {
                self.anchors = Vec::new();
                self.walkers = Vec::new();
            }
        } else {
            self.lists_idle = 0;
        }
        self.step(out)
    }

    /// Applies the end of input: pending look-ahead, anchors and the DFAs' end-of-input
    /// transitions. Returns the final step.
    pub fn finish(&mut self) -> StepResult {
        if self.finished {
            return self.step(Vec::new());
        }
        let engine = self.engine.clone();
        let sc = &engine.scanner;
        let mut found = Vec::new();
        // Raw view: end of input.
        {
            let view = RawView {
                base: self.raw_pos,
                chunk: &[],
                tail: &self.raw_tail,
            };
            for g in 0..sc.raw_dfas.len() {
                let (sid, free) = (self.raw[g].0, self.raw[g].1 as u64);
                let eoi = sc.raw_dfas[g].0.fwd.next_eoi_state(sid);
                raw_matches(
                    &engine,
                    &view,
                    g,
                    eoi,
                    (self.raw_pos, self.raw_pos, free),
                    &mut found,
                );
            }
            for a in self.anchors.drain(..) {
                confirm_anchor(&engine, &view, a, self.raw_pos, &mut found);
            }
        }
        // Word view: the held character, the closing space, then end of input.
        BATCH.with(|b| {
            let mut b = b.borrow_mut();
            b.clear();
            self.norm.finish(&mut *b);
            self.scan_words(&engine, &b, &mut found);
        });
        if let Some(at) = take_space(&mut self.pending_space) {
            for (g, group) in sc.word_anchored.iter().enumerate() {
                if self.active_groups & (1 << g) != 0 {
                    small_room(&mut self.walkers);
                    self.walkers.push(Walker {
                        group: g as u16,
                        sid: group.after_space,
                        start: at,
                    });
                }
            }
        }
        let view = self.word_view(&NO_BATCH);
        let mut reported = Vec::new();
        for &w in &self.walkers {
            let g = &sc.word_anchored[w.group as usize];
            let eoi = g.dfa.next_eoi_state(w.sid);
            walker_matches(sc, &view, w, eoi, self.word_pos, &mut reported, &mut found);
        }
        for g in 0..sc.word_dfas.len() {
            let (sid, free) = (self.wdfa[g].0, self.wdfa[g].1 as u64);
            let eoi = sc.word_dfas[g].0.fwd.next_eoi_state(sid);
            let end = self.word_pos;
            word_dfa_matches(sc, &view, g, eoi, (end, self.word_pos, free), &mut found);
        }
        self.walkers.clear();
        if matches!(self.lang, LangState::Probing(_)) {
            found.extend(self.decide_language());
        }
        self.finished = true;
        let mut out = Vec::new();
        self.accept_all(&engine, found, &mut out);
        self.step(out)
    }

    /// Decides the language from the probe; returns the triggers found meanwhile.
    fn decide_language(&mut self) -> Vec<Found> {
        let mut waiting = Vec::new();
        if let LangState::Probing(p) = &mut self.lang {
            waiting = std::mem::take(&mut p.waiting);
            let set = LangSet::detect(&p.buf);
            self.lang = LangState::Decided(set);
        }
        self.update_active_groups();
        waiting
    }

    /// Once the language is known, the anchored groups none of whose triggers can apply are no
    /// longer walked (their hits would be dropped by the language check anyway).
    fn update_active_groups(&mut self) {
        let Some(set) = self.lang_set().copied() else {
            return;
        };
        let mut active = 0u64;
        for (g, group) in self.engine.scanner.word_anchored.iter().enumerate() {
            if group.langs.iter().any(|&l| set.accepts(l)) {
                active |= 1 << g;
            }
        }
        self.active_groups = active;
    }

    fn lang_set(&self) -> Option<&LangSet> {
        match &self.lang {
            LangState::Decided(s) => Some(s),
            LangState::Probing(_) => None,
        }
    }

    /// Language check, then scoring. Hits that become reportable go to `out`.
    /// Gives the hits found by one step (and those that waited for the language) to their rules,
    /// by start. Before a hit is added, its rule decides the windows that end before the hit's
    /// start: no hit still to come starts earlier, whether later in this batch (sorted) or in a
    /// later chunk (the hit floor). So a rule holds the hits of about one window, however many
    /// a single step brings, and whole texts and streams agree.
    fn accept_all(&mut self, engine: &Engine, mut found: Vec<Found>, out: &mut Vec<Found>) {
        if found.is_empty() {
            return;
        }
        found.sort_unstable_by_key(|f| (f.start, f.end, f.trigger));
        let floor = if self.finished {
            u64::MAX
        } else {
            self.hit_floor()
        };
        for f in found {
            self.accept(engine, f, floor.min(f.start), out);
        }
    }

    fn accept(&mut self, engine: &Engine, f: Found, floor: u64, out: &mut Vec<Found>) {
        let t = &engine.rules.triggers[f.trigger as usize];
        if t.lang != NEUTRAL {
            match self.lang_set() {
                None => {
                    if let LangState::Probing(p) = &mut self.lang {
                        p.waiting.push(f);
                    }
                    return;
                }
                Some(set) if !set.accepts(t.lang) => return,
                Some(_) => {}
            }
        }
        let i = match self.rules.binary_search_by_key(&t.rule, |r| r.0) {
            Ok(i) => i,
            Err(i) => {
                if self.rules.capacity() == 0 {
                    // Most streams that hit anything hit one rule.
                    self.rules.reserve_exact(1);
                }
                self.rules.insert(i, (t.rule, RuleState::default()));
                i
            }
        };
        let st = &mut self.rules[i].1;
        if let Some(action) = settle_rule(engine, t.rule, st, floor, out) {
            self.action = self.action.max(action);
        }
        st.add(f, t.weight, out);
    }

    /// Decides the rules' windows that end before `floor`, the hit floor (all of them once the
    /// stream is finished); a rule that fires raises the action and reports its hits in `out`.
    fn settle_rules(&mut self, floor: u64, out: &mut Vec<Found>) {
        for (i, st) in &mut self.rules {
            if st.held.is_empty() {
                continue;
            }
            if let Some(action) = settle_rule(&self.engine, *i, st, floor, out) {
                self.action = self.action.max(action);
            }
            if self.finished {
                st.held = Vec::new();
            }
        }
    }

    fn step(&mut self, mut found: Vec<Found>) -> StepResult {
        // One hit floor per step, for the windows and the release (scoring does not move it).
        let floor = if self.finished {
            u64::MAX
        } else {
            self.hit_floor()
        };
        self.settle_rules(floor, &mut found);
        let mut hits = Vec::new();
        if !found.is_empty() {
            let triggers = &self.engine.rules.triggers;
            found.sort_by(|a, b| {
                (a.start, a.end, &triggers[a.trigger as usize].id).cmp(&(
                    b.start,
                    b.end,
                    &triggers[b.trigger as usize].id,
                ))
            });
            let rep = self.reported.get_or_insert_with(Box::default);
            for f in &found {
                if !rep.distinct.contains(&f.trigger) {
                    rep.distinct.push(f.trigger);
                }
                if self.keep_hits && rep.hits.len() < MAX_KEPT_HITS {
                    rep.hits.push(*f);
                }
            }
            hits = found.iter().map(|f| hit_of(&self.engine, f)).collect();
        }
        let release = if self.finished {
            self.raw_pos
        } else {
            self.release_bound(floor)
        };
        self.released = self.released.max(release);
        let language = self.lang_set().and_then(|s| s.primary).map(lang::code);
        // The message depends only on the action, the language and the distinct triggers: rebuild
        // it when one of them changes, not on every chunk.
        // (No hit reported yet: the action is ALLOW, which has none.)
        let message = match &mut self.reported {
            Some(rep) => {
                let key = (self.action, language, rep.distinct.len());
                if rep.message_key != Some(key) {
                    rep.message = self.engine.message(self.action, &rep.distinct, language);
                    rep.message_key = Some(key);
                }
                rep.message.as_ref().map(|(m, _)| m.to_string())
            }
            None => None,
        };
        StepResult {
            action: self.action,
            hits,
            release_offset: self.released,
            language,
            message,
        }
    }

    /// The original offset before which no text can be released: no trigger can still complete
    /// a match before it (`floor`, the hit floor), and no hit before it can still be reported.
    fn release_bound(&self, floor: u64) -> u64 {
        let mut r = floor;
        // Hits held below threshold by a rule whose action withholds text.
        for (i, st) in &self.rules {
            if !st.fired && self.engine.rules.rules[*i].action.withholds() {
                if let Some(start) = st.held_start() {
                    r = r.min(start);
                }
            }
        }
        r
    }

    /// The original offset before which no trigger can still complete a match: every hit not
    /// yet given to a rule (still to be found, or waiting for the language) starts at or after it.
    fn hit_floor(&self) -> u64 {
        // A partial match is never older than the longest pattern (plus the DFA's one-byte delay).
        let mut r = self.raw_oldest;
        r = r.min(self.norm.settled_offset());
        // Word view: the oldest live partial match.
        let oldest = self.word_oldest;
        if oldest < self.word_pos {
            r = r.min(self.word_view(&NO_BATCH).orig_start(oldest));
        }
        // Hits waiting for the language.
        if let LangState::Probing(p) = &self.lang {
            for f in &p.waiting {
                r = r.min(f.start);
            }
        }
        r
    }

    /// The word view's bytes and spans: the tail (older bytes) and this chunk's batch from
    /// offset `word_pos` on.
    fn word_view<'a>(&'a self, batch: &'a WordBatch) -> WordView<'a> {
        WordView {
            base: self.word_pos,
            batch,
            tail: &self.word_tail,
        }
    }

    /// Walks the word-view automata over one batch of normalized bytes, one automaton at a time,
    /// then keeps in the tail what a partial match can still reach.
    fn scan_words(&mut self, engine: &Engine, b: &WordBatch, found: &mut Vec<Found>) {
        let sc = &engine.scanner;
        let n = b.bytes.len();
        if n == 0 {
            return;
        }
        let base = self.word_pos;
        {
            let view = WordView {
                base,
                batch: b,
                tail: &self.word_tail,
            };
            let mut spawns = Vec::new();
            if let Some(ac) = &sc.word_ac {
                let at = (self.ac_sid, self.ac_free);
                (self.ac_sid, self.ac_free) = match ac {
                    Phrases::Dfa(a) => phrase_loop(a, sc, &view, at, found, &mut spawns),
                    Phrases::Nfa(a) => phrase_loop(a, sc, &view, at, found, &mut spawns),
                };
            }
            if !sc.word_anchored.is_empty() {
                let mut reported: Vec<(u16, PatternID)> = Vec::new();
                let walkers = &mut self.walkers;
                let active = self.active_groups;
                let mut next_spawn = 0;
                // A spawn literal that ended at `at` starts a walker there, in its state after
                // the literal (once per group and start), kept in start order.
                let spawn_at = |walkers: &mut Vec<Walker>, at: u64, next: &mut usize| {
                    while let Some(&(end, lit, len)) = spawns.get(*next) {
                        if end != at {
                            break;
                        }
                        *next += 1;
                        let (group, sid) = sc.spawn_lits[lit as usize];
                        if active & (1 << group) == 0 {
                            continue;
                        }
                        let start = end - len as u64;
                        if walkers.iter().any(|w| w.group == group && w.start == start) {
                            continue;
                        }
                        let i = walkers
                            .iter()
                            .rposition(|w| w.start <= start)
                            .map_or(0, |i| i + 1);
                        small_room(walkers);
                        walkers.insert(i, Walker { group, sid, start });
                    }
                };
                let bytes = &b.bytes[..];
                let mut spawn_next = spawns.first().map_or(u64::MAX, |s| s.0);
                let mut k = 0;
                while k < n {
                    if walkers.is_empty() && self.pending_space == NO_SPACE {
                        // Nothing is walking: skip to the next space or spawn literal.
                        let lim = (spawn_next.saturating_sub(base) as usize).min(n);
                        match bytes[k..lim].iter().position(|&c| c == b' ') {
                            Some(j) => k += j,
                            None => {
                                k = lim;
                                if k == n {
                                    break;
                                }
                            }
                        }
                    }
                    let byte = bytes[k];
                    let end = base + k as u64 + 1;
                    k += 1;
                    if end - 1 == spawn_next {
                        spawn_at(walkers, end - 1, &mut next_spawn);
                        spawn_next = spawns.get(next_spawn).map_or(u64::MAX, |s| s.0);
                    }
                    if let Some(at) = take_space(&mut self.pending_space) {
                        let mut m = sc.spawn[byte as usize] & active;
                        while m != 0 {
                            let g = m.trailing_zeros() as usize;
                            m &= m - 1;
                            small_room(walkers);
                            walkers.push(Walker {
                                group: g as u16,
                                sid: sc.word_anchored[g].after_space,
                                start: at,
                            });
                        }
                    }
                    if byte == b' ' {
                        self.pending_space = end - 1;
                    }
                    if walkers.is_empty() {
                        continue;
                    }
                    reported.clear();
                    let mut i = 0;
                    while i < walkers.len() {
                        let w = walkers[i];
                        let dfa = &sc.word_anchored[w.group as usize].dfa;
                        let sid = dfa.next_state(w.sid, byte);
                        if dfa.is_special_state(sid) {
                            if dfa.is_dead_state(sid) {
                                walkers.remove(i);
                                continue;
                            }
                            if dfa.is_match_state(sid) {
                                walker_matches(sc, &view, w, sid, end - 1, &mut reported, found);
                            }
                        }
                        walkers[i].sid = sid;
                        i += 1;
                    }
                }
                spawn_at(walkers, base + n as u64, &mut next_spawn);
            }
            for g in 0..sc.word_dfas.len() {
                let (sid, free) = self.wdfa[g];
                let (sid, free) = dfa_loop(
                    &sc.word_dfas[g].0,
                    &b.bytes,
                    base,
                    sid,
                    free as u64,
                    |sid, end, free| {
                        word_dfa_matches(sc, &view, g, sid, (end - 1, end, free), found)
                    },
                );
                self.wdfa[g] = (sid, free as u32);
            }
        }
        // Keep what a partial match can still reach.
        self.word_pos = base + n as u64;
        self.word_oldest = self.word_oldest(sc);
        let keep_from = keep_from(self.word_oldest, self.word_pos, sc.word_window);
        self.word_tail.keep(keep_from, base, n, |i| WordCell {
            start: b.starts[i],
            len: b.lens[i],
            byte: b.bytes[i],
        });
    }

    /// The oldest word-view offset a match not yet reported can start at: the phrase
    /// automaton's partial match, a live walker, a pending space, a word DFA's partial match.
    ///
    /// Computed after each batch (kept in the field of the same name for the release bound).
    fn word_oldest(&self, sc: &Scanner) -> u64 {
        let mut oldest = self
            .ac_free
            .max(self.word_pos.saturating_sub(sc.word_ac_max));
        for d in self.wdfa.iter() {
            oldest = oldest.min((d.1 as u64).max(self.word_pos.saturating_sub(sc.word_dfa_max)));
        }
        for w in &self.walkers {
            oldest = oldest.min(w.start);
        }
        // (NO_SPACE is u64::MAX: no pending space changes nothing.)
        oldest.min(self.pending_space)
    }

    /// Walks the raw-view automata over one chunk, one automaton at a time, confirms the anchors
    /// whose window is complete, then keeps in the tail what a match can still reach.
    fn scan_raw(&mut self, engine: &Engine, bytes: &[u8], found: &mut Vec<Found>) {
        let sc = &engine.scanner;
        let tail = std::mem::take(&mut self.raw_tail);
        let base = self.raw_pos;
        let view = RawView {
            base,
            chunk: bytes,
            tail: &tail,
        };
        if let Some(ac) = &sc.raw_ac {
            // Anchors are confirmed as soon as their window is complete, so few are pending.
            let mut sid = self.raw_ac_sid;
            let mut due = self.anchors.first().map_or(u64::MAX, |a| a.due());
            let start = sc.raw_ac_start;
            let stay = &sc.raw_ac_stay[..];
            let mut k = 0;
            while k < bytes.len() {
                if sid == start {
                    // Bytes that leave the start state where it is are skipped, up to the byte
                    // at which the next anchor is due.
                    let lim = (due.saturating_sub(base + 1).min(bytes.len() as u64)) as usize;
                    while k < lim && stay[bytes[k] as usize] {
                        k += 1;
                    }
                    if k == bytes.len() {
                        break;
                    }
                }
                let b = bytes[k];
                k += 1;
                let pos = base + k as u64;
                sid = ac.next_state(aho_corasick::Anchored::No, sid, b);
                if ac.is_special(sid) && ac.is_match(sid) {
                    self.raw_literals(engine, &view, sid, pos, found);
                    due = self.anchors.first().map_or(u64::MAX, |a| a.due());
                }
                if pos >= due {
                    let n = self.anchors.partition_point(|a| a.due() <= pos);
                    for a in self.anchors.drain(..n) {
                        confirm_anchor(engine, &view, a, pos, found);
                    }
                    due = self.anchors.first().map_or(u64::MAX, |a| a.due());
                }
            }
            self.raw_ac_sid = sid;
        }
        for g in 0..sc.raw_dfas.len() {
            let (sid, free) = self.raw[g];
            // One-byte delay: a match state reached on a byte means the match ended before it.
            let (sid, free) = dfa_loop(
                &sc.raw_dfas[g].0,
                bytes,
                base,
                sid,
                free as u64,
                |sid, pos, free| raw_matches(engine, &view, g, sid, (pos - 1, pos, free), found),
            );
            self.raw[g] = (sid, free as u32);
        }
        let end = base + bytes.len() as u64;
        self.raw_pos = end;
        let due = self.anchors.partition_point(|a| a.due() <= end);
        for a in self.anchors.drain(..due) {
            confirm_anchor(engine, &view, a, end, found);
        }
        self.raw_tail = tail;
        // A burst of digits (anchors of the number shapes) does not keep its room for ever.
        if self.anchors.capacity() > 4 && self.anchors.len() * 2 < self.anchors.capacity() {
            self.anchors
                .shrink_to(self.anchors.len().max(2).next_power_of_two());
        }
        self.raw_oldest = self.raw_oldest(sc);
        let keep_from = keep_from(self.raw_oldest, self.raw_pos, sc.raw_window);
        self.raw_tail
            .keep(keep_from, base, bytes.len(), |i| bytes[i]);
    }

    /// The oldest raw offset a match not yet reported can start at: a raw DFA's partial match,
    /// a pending anchor's look-behind, or the look-behind of an anchor the phrase automaton may
    /// still complete.
    ///
    /// Computed after each chunk (kept in the field of the same name for the release bound).
    fn raw_oldest(&self, sc: &Scanner) -> u64 {
        let mut r = self.raw_pos;
        for d in self.raw.iter() {
            r = r.min((d.1 as u64).max(self.raw_pos.saturating_sub(sc.raw_dfa_max)));
        }
        // An anchor not seen yet starts where the phrase automaton's partial match does; its match
        // may begin up to the largest look-behind before it.
        let partial = self.raw_pos - sc.raw_ac_depth(self.raw_ac_sid);
        r = r.min(partial.saturating_sub(sc.raw_look_behind));
        for a in &self.anchors {
            r = r.min(a.first().saturating_sub(a.look_behind as u64));
        }
        r
    }

    /// Reports the raw phrases and anchors of the aho-corasick match state `sid` reached at `end`.
    fn raw_literals(
        &mut self,
        engine: &Engine,
        view: &RawView<'_>,
        sid: aho_corasick::automaton::StateID,
        end: u64,
        found: &mut Vec<Found>,
    ) {
        let sc = &engine.scanner;
        let Some(ac) = &sc.raw_ac else {
            return;
        };
        for k in 0..ac.match_len(sid) {
            let pid = ac.match_pattern(sid, k);
            let (p, bytes) = &sc.raw_ac_patterns[pid.as_usize()];
            match p.kind {
                RawKind::Literal { len } => found.push(Found {
                    trigger: p.trigger,
                    start: end - len as u64,
                    end,
                }),
                RawKind::Anchor {
                    len,
                    max_len,
                    look_behind,
                    span,
                } => {
                    let anchor_start = end - len as u64;
                    // Anchors are case-sensitive; the automaton folds ASCII case.
                    if !view.equals(anchor_start, bytes) {
                        continue;
                    }
                    let due = anchor_start + max_len as u64 + 1;
                    // Join the pending group of this trigger that began less than `span` bytes
                    // before, or start one. The list stays sorted by `due`.
                    let mut a = PendingAnchor {
                        trigger: p.trigger,
                        first_at: anchor_start as u32,
                        due_at: clamp32(due),
                        look_behind,
                        starts: 1,
                    };
                    if let Some(i) = self.anchors.iter().rposition(|x| {
                        x.trigger == p.trigger
                            && anchor_start >= x.first()
                            && anchor_start - x.first() < span as u64
                    }) {
                        let mut g = self.anchors[i];
                        g.starts |= 1 << (anchor_start - g.first());
                        // Usually the group is the last to fall due and stays in place.
                        let in_order = self.anchors.get(i + 1).is_none_or(|x| x.due() >= due);
                        if due <= g.due() || in_order {
                            g.due_at = clamp32(g.due().max(due));
                            self.anchors[i] = g;
                            continue;
                        }
                        self.anchors.remove(i);
                        g.due_at = clamp32(due);
                        a = g;
                    }
                    let at = self.anchors.partition_point(|x| x.due() <= a.due());
                    small_room(&mut self.anchors);
                    self.anchors.insert(at, a);
                }
                RawKind::Regex { .. } => {}
            }
        }
    }

    /// The verdict for everything seen so far (call after [`finish`](Self::finish) for the final
    /// one). With the original `text`, a SANITIZE verdict carries the sanitized text.
    pub fn verdict(&self, text: Option<&str>) -> Verdict {
        let (kept, distinct) = match &self.reported {
            Some(r) => (&r.hits[..], &r.distinct[..]),
            None => (&[][..], &[][..]),
        };
        let mut hits: Vec<Hit> = kept.iter().map(|f| hit_of(&self.engine, f)).collect();
        hits.sort_by(|a, b| (a.start, a.end, &a.trigger_id).cmp(&(b.start, b.end, &b.trigger_id)));
        hits.dedup();
        let language = self.lang_set().and_then(|s| s.primary).map(lang::code);
        let languages_applied = self.lang_set().map(|s| s.codes()).unwrap_or_default();
        let message = crate::decide::message(&self.engine, self.action, distinct, language);
        let sanitized_text = match text {
            Some(t) if self.action == Action::Sanitize => Some(crate::decide::sanitize(t, &hits)),
            _ => None,
        };
        let rule_scores = self
            .rules
            .iter()
            .filter(|(_, r)| r.fired)
            .map(|(i, r)| (self.engine.rules.rules[*i].id.clone(), r.score))
            .collect();
        Verdict {
            action: self.action,
            hits,
            language,
            languages_applied,
            sanitized_text,
            message,
            rule_scores,
        }
    }
}

/// The hit a trigger's match reports.
fn hit_of(engine: &Engine, f: &Found) -> Hit {
    let t = &engine.rules.triggers[f.trigger as usize];
    let rule = &engine.rules.rules[t.rule];
    Hit {
        rule_id: rule.id.clone(),
        trigger_id: t.id.clone(),
        language: lang::code(t.lang),
        start: f.start,
        end: f.end,
        score: t.weight,
        action: rule.action,
    }
}

/// The raw view during a scan: offsets from `base` on are in the chunk, older ones in the tail.
struct RawView<'a> {
    base: u64,
    chunk: &'a [u8],
    tail: &'a Tail<u8>,
}

impl RawView<'_> {
    /// Bytes `lo..hi` of the stream: borrowed from the chunk when they are all in it.
    fn window(&self, lo: u64, hi: u64) -> std::borrow::Cow<'_, [u8]> {
        if lo >= self.base {
            std::borrow::Cow::Borrowed(
                &self.chunk[(lo - self.base) as usize..(hi - self.base) as usize],
            )
        } else {
            (lo..hi)
                .map(|n| at(self.base, self.chunk, self.tail, n))
                .collect()
        }
    }

    /// Whether bytes `lo..` of the stream are `expect`.
    fn equals(&self, lo: u64, expect: &[u8]) -> bool {
        (0..expect.len()).all(|i| at(self.base, self.chunk, self.tail, lo + i as u64) == expect[i])
    }
}

/// The entry for stream offset `n` of a view: in the current chunk (`batch`, from offset `base`
/// on) or, for older offsets, in the tail.
#[inline]
fn at<T: Copy>(base: u64, batch: &[T], tail: &Tail<T>, n: u64) -> T {
    if n >= base {
        batch[(n - base) as usize]
    } else {
        tail.v[(n - tail.from) as usize]
    }
}

/// The first offset a view's tail keeps, `pos` bytes into the view: from `oldest` (see
/// [`StreamSession::word_oldest`] and [`StreamSession::raw_oldest`]) with one byte of context
/// before it (a DFA's or a confirmation's look-behind sees the real neighbour), and never more
/// than `window` bytes back.
fn keep_from(oldest: u64, pos: u64, window: usize) -> u64 {
    oldest
        .saturating_sub(1)
        .max(pos.saturating_sub(window as u64))
}

/// The last entries of a view before the current chunk: those from offset `from` on, as far
/// back as a partial match, a pending anchor or a look-behind can still reach (see
/// [`keep_from`]); nothing older.
struct Tail<T> {
    from: u64,
    v: Vec<T>,
    /// Consecutive updates that used less than half the room.
    idle: u32,
}

/// Updates of a tail that must use less than half its room before the room is given back.
const TAIL_IDLE_UPDATES: u32 = 16;

impl<T> Default for Tail<T> {
    fn default() -> Self {
        Tail {
            from: 0,
            v: Vec::new(),
            idle: 0,
        }
    }
}

impl<T: Copy> Tail<T> {
    /// Drops the entries before `keep_from`, then appends the `n` new entries `new(i)` (offsets
    /// `base + i`, where the tail ends) from `keep_from` on.
    fn keep(&mut self, keep_from: u64, base: u64, n: usize, new: impl Fn(usize) -> T) {
        debug_assert_eq!(self.from + self.v.len() as u64, base);
        let drop = keep_from.min(base).saturating_sub(self.from) as usize;
        if drop > 0 {
            self.v.drain(..drop);
            self.from += drop as u64;
        }
        let skip = keep_from.saturating_sub(base).min(n as u64) as usize;
        if skip > 0 {
            self.from += skip as u64;
        }
        self.v.extend((skip..n).map(new));
        // What a long partial match or a pending anchor grew is given back once the tail has
        // used less than half of it for a while (not at once: anchors come in bursts, and
        // reallocating at every one cost 8% of a chat stream's speed).
        if self.v.capacity() > 16 && self.v.len() * 2 < self.v.capacity() {
            self.idle += 1;
            if self.idle >= TAIL_IDLE_UPDATES {
                self.v.shrink_to(self.v.len().max(8).next_power_of_two());
                self.idle = 0;
            }
        } else {
            self.idle = 0;
        }
    }

    fn bytes(&self) -> usize {
        self.v.capacity() * std::mem::size_of::<T>()
    }
}

/// Reports the raw-view regex matches of a match state, ending at `end`; `now` is the offset
/// scanned so far (the window reaches it), `free` the DFA's (see [`dfa_window`]).
fn raw_matches(
    engine: &Engine,
    view: &RawView<'_>,
    group: usize,
    sid: StateID,
    (end, now, free): (u64, u64, u64),
    found: &mut Vec<Found>,
) {
    let (dfa, patterns) = &engine.scanner.raw_dfas[group];
    if !dfa.fwd.is_match_state(sid) {
        return;
    }
    let (lo, from) = dfa_window(now, free, engine.scanner.raw_dfa_max);
    let window = view.window(lo, now);
    for k in 0..dfa.fwd.match_len(sid) {
        let pid = dfa.fwd.match_pattern(sid, k);
        let p = patterns[pid.as_usize()];
        let t = &engine.rules.triggers[p.trigger as usize];
        let RawKind::Regex { rev } = p.kind else {
            continue;
        };
        let Some(s) = dfa.find_start(&window, (from - lo) as usize, (end - lo) as usize, rev)
        else {
            continue;
        };
        if let Some(v) = t.validate {
            if !v.check(&window[s..(end - lo) as usize]) {
                continue;
            }
        }
        found.push(Found {
            trigger: p.trigger,
            start: lo + s as u64,
            end,
        });
    }
}

/// Runs an anchored trigger's regex over the window around its anchor; `raw_pos` is the offset
/// scanned so far.
fn confirm_anchor(
    engine: &Engine,
    view: &RawView<'_>,
    a: PendingAnchor,
    raw_pos: u64,
    found: &mut Vec<Found>,
) {
    let t = &engine.rules.triggers[a.trigger as usize];
    let TriggerKind::Anchored {
        max_len,
        look_behind,
        ..
    } = &t.kind
    else {
        return;
    };
    let Some(re) = engine.scanner.confirm[a.trigger as usize].as_ref() else {
        return;
    };
    // The window ends where it is complete (`due`), or at the end of input if that comes first.
    let now = raw_pos.min(a.due());
    let ring = engine.scanner.raw_window as u64;
    // One byte of context on each side, so look-around sees the real neighbours.
    let lo = a
        .first()
        .saturating_sub(*look_behind as u64 + 1)
        .max(now.saturating_sub(ring));
    let hi = (a.last() + *max_len as u64 + 1).min(now);
    let window = view.window(lo, hi);
    let span_lo = a.first().saturating_sub(*look_behind as u64).max(lo) - lo;
    let span_hi = (a.last() + *max_len as u64).min(hi) - lo;
    let input = Input::new(&window).range(span_lo as usize..span_hi as usize);
    // Every match in which an anchor of the group starts.
    for m in re.find_iter(input) {
        let (s, e) = (lo + m.start() as u64, lo + m.end() as u64);
        if a.starts_in(s, e) {
            if let Some(v) = t.validate {
                if !v.check(&window[m.start()..m.end()]) {
                    continue;
                }
            }
            found.push(Found {
                trigger: a.trigger,
                start: s,
                end: e,
            });
        }
    }
}

/// One chunk of normalized bytes, with the original span of each (a per-thread scratch buffer).
#[derive(Default)]
struct WordBatch {
    bytes: Vec<u8>,
    starts: Vec<u32>,
    lens: Vec<u8>,
}

impl WordBatch {
    fn clear(&mut self) {
        self.bytes.clear();
        self.starts.clear();
        self.lens.clear();
    }
}

impl NormSink for WordBatch {
    #[inline]
    fn push(&mut self, byte: u8, orig_start: u64, orig_len: u8) {
        self.bytes.push(byte);
        self.starts.push(orig_start as u32);
        self.lens.push(orig_len);
    }

    #[inline]
    fn push_ascii_run(&mut self, run: &[u8], orig_start: u64) {
        let at = orig_start as u32;
        self.bytes.extend(run.iter().map(u8::to_ascii_lowercase));
        self.starts.extend(at..at + run.len() as u32);
        self.lens.resize(self.lens.len() + run.len(), 1);
    }
}

/// Input bytes normalized into one batch.
const BATCH_INPUT: usize = 4096;

thread_local! {
    static BATCH: std::cell::RefCell<WordBatch> = std::cell::RefCell::new(WordBatch::default());
}

static NO_BATCH: WordBatch = WordBatch {
    bytes: Vec::new(),
    starts: Vec::new(),
    lens: Vec::new(),
};

/// A normalized byte kept in the word view's tail, with its original span.
#[derive(Clone, Copy)]
#[repr(C, packed)]
struct WordCell {
    start: u32,
    len: u8,
    byte: u8,
}

/// The word view during a scan: offsets from `base` on are in the batch, older ones in the tail.
struct WordView<'a> {
    base: u64,
    batch: &'a WordBatch,
    tail: &'a Tail<WordCell>,
}

impl WordView<'_> {
    #[inline]
    fn cell(&self, n: u64) -> WordCell {
        if n >= self.base {
            let i = (n - self.base) as usize;
            WordCell {
                start: self.batch.starts[i],
                len: self.batch.lens[i],
                byte: self.batch.bytes[i],
            }
        } else {
            self.tail.v[(n - self.tail.from) as usize]
        }
    }

    #[inline]
    fn byte(&self, n: u64) -> u8 {
        if n >= self.base {
            self.batch.bytes[(n - self.base) as usize]
        } else {
            self.tail.v[(n - self.tail.from) as usize].byte
        }
    }

    fn orig_start(&self, n: u64) -> u64 {
        self.cell(n).start as u64
    }

    fn orig_end(&self, n: u64) -> u64 {
        let c = self.cell(n);
        c.start as u64 + c.len as u64
    }

    /// Maps a normalized span (framing spaces trimmed) to the original text.
    fn span(&self, mut start: u64, mut end: u64) -> Option<(u64, u64)> {
        while start < end && self.byte(start) == b' ' {
            start += 1;
        }
        while end > start && self.byte(end - 1) == b' ' {
            end -= 1;
        }
        if start >= end {
            return None;
        }
        Some((self.orig_start(start), self.orig_end(end - 1)))
    }

    fn window(&self, lo: u64, hi: u64) -> Vec<u8> {
        (lo..hi).map(|n| self.byte(n)).collect()
    }
}

/// The bytes that keep an aho-corasick automaton in its (unanchored) start state `start`.
/// The depth of every state of an aho-corasick automaton (the length of the pattern prefix it
/// stands for): a breadth-first walk from the start state, where the first visit of a state is
/// at its depth (no input shorter than the prefix can end in it). State ids are multiples of a
/// power of two (the DFA's stride): returns the depths indexed by id shifted right by its log,
/// and that log. 255 stands for unknown or deeper (the caller falls back to the longest
/// pattern).
fn ac_depths<A: AcAutomaton>(ac: &A) -> (Vec<u8>, u32) {
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

fn ac_stay<A: AcAutomaton>(ac: &A, start: aho_corasick::automaton::StateID) -> Box<[bool]> {
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
fn dfa_loop(
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

/// Walks the phrase automaton over a batch from `(sid, free)`: its state, and the offset at
/// which it was last in its start state. Returns both at the end of the batch. Phrase matches go
/// to `found`; spawn-literal matches to `spawns` as (end, literal, length), in order of end.
fn phrase_loop<A: AcAutomaton>(
    ac: &A,
    sc: &Scanner,
    view: &WordView<'_>,
    (mut sid, mut free): (aho_corasick::automaton::StateID, u64),
    found: &mut Vec<Found>,
    spawns: &mut Vec<(u64, u32, u32)>,
) -> (aho_corasick::automaton::StateID, u64) {
    let bytes = &view.batch.bytes[..];
    let stay = &sc.word_ac_stay[..];
    let mut k = 0;
    while k < bytes.len() {
        if sid == sc.word_ac_start {
            // Most bytes of a word leave the start state where it is: skip them.
            while k < bytes.len() && stay[bytes[k] as usize] {
                k += 1;
            }
            free = view.base + k as u64;
            if k == bytes.len() {
                break;
            }
        }
        let byte = bytes[k];
        k += 1;
        sid = ac.next_state(aho_corasick::Anchored::No, sid, byte);
        if ac.is_special(sid) && ac.is_match(sid) {
            let end = view.base + k as u64;
            for m in 0..ac.match_len(sid) {
                let p = sc.word_ac_patterns[ac.match_pattern(sid, m).as_usize()];
                if p.trigger & SPAWN != 0 {
                    spawns.push((end, p.trigger & !SPAWN, p.len));
                    continue;
                }
                let start = end - p.len as u64;
                if let Some((os, oe)) = view.span(start + p.lead as u64, end - p.trail as u64) {
                    found.push(Found {
                        trigger: p.trigger,
                        start: os,
                        end: oe,
                    });
                }
            }
        }
    }
    if sid == sc.word_ac_start {
        free = view.base + bytes.len() as u64;
    }
    (sid, free)
}

/// The window a match of an unanchored DFA is searched back in, ending at `now` (the offset
/// scanned so far): from the DFA's `free` offset (no partial match began before it), at most
/// `max` bytes back, and one byte of context before. Returns (window start, search start).
fn dfa_window(now: u64, free: u64, max: u64) -> (u64, u64) {
    let lo = free.max(now.saturating_sub(max));
    (lo.saturating_sub(1), lo)
}

/// Reports the matches of a word-view unanchored DFA in state `sid`, ending at `end`; `now` is
/// the word offset scanned so far (the window reaches it, for look-ahead), `free` the DFA's.
fn word_dfa_matches(
    sc: &Scanner,
    view: &WordView<'_>,
    group: usize,
    sid: StateID,
    (end, now, free): (u64, u64, u64),
    found: &mut Vec<Found>,
) {
    let (dfa, triggers) = &sc.word_dfas[group];
    if !dfa.fwd.is_match_state(sid) {
        return;
    }
    let (lo, from) = dfa_window(now, free, sc.word_dfa_max);
    let window = view.window(lo, now);
    for k in 0..dfa.fwd.match_len(sid) {
        let pid = dfa.fwd.match_pattern(sid, k);
        let trigger = triggers[pid.as_usize()];
        let Some(s) = dfa.find_start(&window, (from - lo) as usize, (end - lo) as usize, pid)
        else {
            continue;
        };
        if let Some((os, oe)) = view.span(lo + s as u64, end) {
            found.push(Found {
                trigger,
                start: os,
                end: oe,
            });
        }
    }
}

/// Reports the matches of an anchored walker in state `sid`, ending at `end`. A pattern already
/// reported at this end by an older walker (`reported`) is not reported again.
fn walker_matches(
    sc: &Scanner,
    view: &WordView<'_>,
    w: Walker,
    sid: StateID,
    end: u64,
    reported: &mut Vec<(u16, PatternID)>,
    found: &mut Vec<Found>,
) {
    let g = &sc.word_anchored[w.group as usize];
    if !g.dfa.is_match_state(sid) {
        return;
    }
    for k in 0..g.dfa.match_len(sid) {
        let pid = g.dfa.match_pattern(sid, k);
        if reported.contains(&(w.group, pid)) {
            continue;
        }
        reported.push((w.group, pid));
        if let Some((os, oe)) = view.span(w.start, end) {
            found.push(Found {
                trigger: g.triggers[pid.as_usize()],
                start: os,
                end: oe,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_from_where_it_is_told_and_gives_room_back() {
        let mut t: Tail<u8> = Tail::default();
        let data: Vec<u8> = (0..=255u8).collect();
        // Offsets 0..100 arrive; keep from 90.
        t.keep(90, 0, 100, |i| data[i]);
        assert_eq!((t.from, &t.v[..]), (90, &data[90..100]));
        // 100..110 arrive; keep from 95: 95..110.
        t.keep(95, 100, 10, |i| data[100 + i]);
        assert_eq!((t.from, &t.v[..]), (95, &data[95..110]));
        // Keep from beyond what arrived: only the new entries from there.
        t.keep(115, 110, 10, |i| data[110 + i]);
        assert_eq!((t.from, &t.v[..]), (115, &data[115..120]));
        // Nothing kept.
        t.keep(130, 120, 10, |i| data[120 + i]);
        assert_eq!((t.from, t.v.len()), (130, 0));
        // A long partial match grows the tail; once it has been over for a while the room is
        // given back.
        t.keep(130, 130, 120, |i| data[130 + i]);
        let grown = t.v.capacity();
        assert!(grown >= 120);
        t.keep(248, 250, 2, |i| data[250 + i]);
        assert_eq!((t.from, &t.v[..]), (248, &data[248..252]));
        for k in 1..TAIL_IDLE_UPDATES {
            assert_eq!(t.v.capacity(), grown, "given back after {k} updates");
            let at = 251 + k as u64;
            t.keep(at - 2, at, 1, |_| 0);
        }
        assert!(t.v.capacity() <= 16, "capacity {}", t.v.capacity());
    }

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
