//! The word view: the normalizer's output, for the language triggers.
//!
//! - **Phrases** of every language, compiled already normalized and framed by spaces (word
//!   boundaries are plain spaces), are one aho-corasick automaton ([`Phrases`]): a DFA up to
//!   [`PHRASE_DFA_MAX_PATTERNS`] phrases, a contiguous NFA beyond.
//! - **Regexes of spaced languages** run as anchored DFA *walkers* ([`AnchoredGroup`],
//!   [`Walker`]) started at word starts: the unanchored union of many phrase-like regexes
//!   explodes in determinization, the anchored one stays small, and a walker knows where its
//!   match started. Groups are kept per language, so a group none of whose languages applies
//!   is not walked. Where every match of a group begins with one of a few literals, the
//!   literals ride in the phrase automaton ([`SPAWN`] patterns) and spawn the group's walker,
//!   already past the literal; the other groups are spawned at every space whose next byte
//!   their DFA survives.
//! - **Regexes of zh/ja/th** run in unanchored dense DFAs (one per rule) with reverse DFAs for
//!   the match starts.
//!
//! [`WordAutomata`] is what a ruleset compiles to; [`WordState`] is one stream's walk: the
//! normalizer, the automaton states, live walkers, and the tail of normalized bytes (with their
//! original spans, [`WordCell`]) that a match not yet reported can still reach
//! ([`WordState::oldest`]). A chunk goes through the normalizer in slices of [`BATCH_INPUT`]
//! bytes into a per-thread [`WordBatch`], so matches map back to the caller's bytes through the
//! batch or, for older offsets, the tail.

use super::dfa::{
    ac_stay, build_halving, dfa_loop, dfa_window, DfaAt, RegexDfa, GROUP_DFA_LIMIT, SHORTEN,
};
use super::tail::{keep_from, small_room, Tail};
use super::{ScanConfig, ScannerStats};
use crate::lang::{self, LangSet, NEUTRAL};
use crate::normalize::{NormSink, Normalizer};
use crate::rules::{syntax_config, Boundary, CompiledRuleset, LoadError, TriggerKind, View};
use crate::score::Match;
use aho_corasick::automaton::Automaton as AcAutomaton;
use regex_automata::dfa::{dense, Automaton as DfaAutomaton, StartKind};
use regex_automata::util::primitives::StateID;
use regex_automata::{nfa::thompson, Anchored, MatchKind, PatternID};

/// What an aho-corasick pattern of the word view stands for.
#[derive(Clone, Copy, Debug)]
struct AcPattern {
    trigger: u32,
    /// Pattern length in normalized bytes, framing spaces included.
    len: u32,
    lead: u8,
    trail: u8,
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
    /// The state after the text's framing space (offset 0), where `\A` holds: a regex may
    /// match at the start of the text only (`\A i am going to`).
    after_text_start: StateID,
    /// Languages of the group's triggers (a group of no applicable language is not walked).
    langs: Vec<crate::lang::LangId>,
}

impl AnchoredGroup {
    /// The state of a walker spawned at the space at normalized offset `at`.
    fn spawn_state(&self, at: u64) -> StateID {
        if at == 0 {
            self.after_text_start
        } else {
            self.after_space
        }
    }

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
        let text_start = dfa
            .start_state(
                &regex_automata::util::start::Config::new()
                    .anchored(Anchored::Yes)
                    .look_behind(None),
            )
            .map_err(|e| e.to_string())?;
        let after_text_start = dfa.next_state(text_start, b' ');
        Ok(AnchoredGroup {
            dfa,
            triggers,
            after_space,
            after_text_start,
            langs: Vec::new(),
        })
    }
}

/// A word-view walker: an anchored DFA run started at a space.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Walker {
    group: u16,
    sid: StateID,
    start: u64,
}

/// The word view's automata, compiled once per ruleset and shared by every stream.
pub(crate) struct WordAutomata {
    ac: Option<Phrases>,
    ac_patterns: Vec<AcPattern>,
    /// Longest phrase: outside the start state, a partial match began at most this far back.
    pub(crate) ac_max: u64,
    ac_start: aho_corasick::automaton::StateID,
    /// Bytes that keep the phrase automaton in its start state (skipped without a lookup).
    ac_stay: Box<[bool]>,
    /// Regex DFAs of unspaced languages: one per rule, split further where a rule's regexes
    /// together would exceed [`GROUP_DFA_LIMIT`]. Each holds (forward pattern id → trigger).
    dfas: Vec<(RegexDfa, Vec<u32>)>,
    /// Regexes of languages that separate words: anchored DFAs, walked from word starts (a
    /// walker per word start, dropped when it dies).
    anchored: Vec<AnchoredGroup>,
    /// For each byte, the anchored groups (bit per group) whose walker survives a space followed
    /// by that byte: the only walkers spawned there. Groups spawned by literals are not here.
    spawn: Box<[u64]>,
    /// Prefix literals in the phrase automaton (pattern `SPAWN | i`): the group whose walker a
    /// match of literal `i` spawns, and the walker's state after the literal.
    spawn_lits: Vec<(u16, StateID)>,
    /// The most bytes the tail may keep (a power of two): what the longest match reaches back.
    /// A stream keeps less, see [`Tail`].
    pub(crate) window: usize,
    /// Longest match of the regex DFAs (plus the one-byte match delay).
    pub(crate) dfa_max: u64,
}

impl WordAutomata {
    /// Compiles the word-view triggers of `rs`, counting them in `stats`.
    pub(crate) fn build(
        rs: &CompiledRuleset,
        config: &ScanConfig,
        stats: &mut ScannerStats,
    ) -> Result<Self, LoadError> {
        let fail = |what: &str, e: String| LoadError {
            file: rs.source.clone(),
            line: None,
            message: format!("{what}: {e}"),
        };
        let mut ac_pats: Vec<String> = Vec::new();
        let mut ac_patterns = Vec::new();
        let mut word_re: Vec<(usize, u32, String)> = Vec::new();
        let mut word_max = 8usize;
        let mut dfa_max = 0usize;
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
                        ac_patterns.push(AcPattern {
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
                    dfa_max = dfa_max.max(*max_len);
                    word_re.push((t.rule, ti, pattern.clone()));
                    stats.word_regexes += 1;
                }
                _ => {}
            }
        }
        // Regexes of languages with spaces start at a word: anchored walkers. The others (zh, ja,
        // th) can start anywhere: unanchored DFAs, one per rule.
        let spaced = |ti: u32| {
            let l = rs.triggers[ti as usize].lang;
            l == NEUTRAL || lang::LANGS[l as usize].spaced
        };
        let anchored_res: Vec<(u32, String)> = word_re
            .iter()
            .filter(|r| spaced(r.1))
            .map(|r| {
                // `(?: a|\A b)`: a group of alternatives that start with a space or at the
                // text's start (`\A `) stays as written.
                let p = if r.2.starts_with(' ') || r.2.starts_with("(?: ") {
                    r.2.clone()
                } else {
                    format!(" (?:{})", r.2)
                };
                (r.1, p)
            })
            .collect();
        let trace = std::env::var_os("MISTGUARD_TRACE_BUILD").is_some();
        let t0 = std::time::Instant::now();
        let mut anchored = Vec::new();
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
        let mut buckets: Vec<usize> = anchored_res.iter().map(|a| bucket(a.0)).collect();
        buckets.sort();
        buckets.dedup();
        // Within a bucket, regexes whose matches all begin with one of a few prefix literals are
        // grouped apart: their walkers are spawned where the phrase automaton finds a literal,
        // not at every word start.
        let literals: Vec<Option<Vec<Vec<u8>>>> = anchored_res
            .iter()
            .map(|a| prefix_literals(&a.1).filter(|_| config.spawn_literals))
            .collect();
        for b in buckets {
            for prefixed in [true, false] {
                let part: Vec<(u32, String)> = anchored_res
                    .iter()
                    .zip(&literals)
                    .filter(|(a, l)| bucket(a.0) == b && l.is_some() == prefixed)
                    .map(|(a, _)| a.clone())
                    .collect();
                if !part.is_empty() {
                    build_anchored(rs, &part, &mut anchored)?;
                }
            }
        }
        if anchored.len() > 64 {
            return Err(fail(
                "word-view regexes",
                format!(
                    "{} anchored DFA groups (at most 64): merge or shorten regexes",
                    anchored.len()
                ),
            ));
        }
        for g in &mut anchored {
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
        let literal_of: std::collections::HashMap<u32, &Vec<Vec<u8>>> = anchored_res
            .iter()
            .zip(&literals)
            .filter_map(|(a, l)| l.as_ref().map(|l| (a.0, l)))
            .collect();
        let mut spawn_lits: Vec<(u16, StateID)> = Vec::new();
        let mut prefixed_groups = 0u64;
        for (gi, g) in anchored.iter().enumerate() {
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
                ac_patterns.push(AcPattern {
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
        for (gi, g) in anchored.iter().enumerate() {
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
                anchored_res.len(),
                anchored.len(),
                t0.elapsed()
            );
        }
        let ac_max = ac_pats.iter().map(|p| p.len()).max().unwrap_or(0) as u64;
        let ac = if ac_pats.is_empty() {
            None
        } else {
            Some(Phrases::build(&ac_pats).map_err(|e| fail("word-view phrases", e))?)
        };
        let ac_start = match &ac {
            Some(ac) => ac.start().map_err(|e| fail("word-view phrases", e))?,
            None => aho_corasick::automaton::StateID::ZERO,
        };
        let mut dfas = Vec::new();
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
            build_groups(rs, &group, &mut dfas)?;
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
        let ac_stay = match &ac {
            Some(Phrases::Dfa(a)) => ac_stay(a, ac_start),
            Some(Phrases::Nfa(a)) => ac_stay(a, ac_start),
            None => vec![true; 256].into_boxed_slice(),
        };
        if trace {
            eprintln!(
                "start-state bytes: word phrases {}",
                ac_stay.iter().filter(|s| **s).count()
            );
        }
        stats.word_ac_bytes = ac.as_ref().map_or(0, |a| a.memory_usage());
        stats.word_ac_kind = ac.as_ref().map_or("none", |a| a.kind());
        stats.word_dfa_bytes = dfas.iter().map(|d| d.0.memory_usage()).sum();
        stats.word_dfa_groups = dfas.len();
        stats.word_anchored_bytes = anchored.iter().map(|g| g.dfa.memory_usage()).sum();
        stats.word_anchored_groups = anchored.len();
        let window = (word_max + 2).next_power_of_two();
        stats.word_window = window;
        Ok(WordAutomata {
            ac,
            ac_patterns,
            ac_max,
            ac_start,
            ac_stay,
            dfas,
            anchored,
            spawn,
            spawn_lits,
            window,
            dfa_max: dfa_max as u64 + 1,
        })
    }
}

/// Unanchored DFAs (with reverse DFAs for match starts) over word-view regexes.
fn build_groups(
    rs: &CompiledRuleset,
    patterns: &[(u32, String)],
    out: &mut Vec<(RegexDfa, Vec<u32>)>,
) -> Result<(), LoadError> {
    let build = |part: &[(u32, String)]| {
        let res: Vec<String> = part.iter().map(|p| p.1.clone()).collect();
        RegexDfa::build_limited(View::Word, &res, &res, GROUP_DFA_LIMIT)
            .map(|d| (d, part.iter().map(|p| p.0).collect()))
    };
    build_halving(rs, patterns, &|p| p.0, &build, SHORTEN, out)
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

/// One stream's walk over the word view.
pub(crate) struct WordState {
    norm: Normalizer,
    /// Normalized bytes scanned so far.
    pub(crate) pos: u64,
    ac_sid: aho_corasick::automaton::StateID,
    /// Offset at which the phrase automaton was last in its start state.
    ac_free: u64,
    /// State of each regex DFA, and the offset after which none of its partial matches can have
    /// started.
    dfas: Box<[DfaAt]>,
    /// Live anchored walkers, oldest first.
    pub(crate) walkers: Vec<Walker>,
    /// A space whose walkers are spawned when the next byte shows which can live
    /// ([`NO_SPACE`]: none).
    pending_space: u64,
    /// Anchored groups (bit per group) that hold a trigger of an applicable language.
    active_groups: u64,
    pub(crate) tail: Tail<WordCell>,
    /// [`oldest`](Self::oldest) after the last batch.
    oldest: u64,
}

impl WordState {
    pub(crate) fn new(a: &WordAutomata) -> WordState {
        WordState {
            norm: Normalizer::new(),
            pos: 0,
            ac_sid: a.ac_start,
            ac_free: 0,
            dfas: a.dfas.iter().map(|d| (d.0.start, 0)).collect(),
            walkers: Vec::new(),
            pending_space: NO_SPACE,
            active_groups: u64::MAX,
            tail: Tail::default(),
            oldest: 0,
        }
    }

    /// Bytes of the DFA states this stream keeps.
    pub(crate) fn dfa_state_bytes(&self) -> usize {
        self.dfas.len() * std::mem::size_of::<DfaAt>()
    }

    /// Once the language is known, the anchored groups none of whose triggers can apply are no
    /// longer walked, and their live walkers are dropped (their hits would be dropped by the
    /// language check anyway).
    pub(crate) fn set_languages(&mut self, a: &WordAutomata, set: &LangSet) {
        let mut active = 0u64;
        for (g, group) in a.anchored.iter().enumerate() {
            if group.langs.iter().any(|&l| set.accepts(l)) {
                active |= 1 << g;
            }
        }
        self.active_groups = active;
        // Walkers of groups that no longer apply could only find hits the language check drops;
        // they would hold the release back until they die.
        self.walkers.retain(|w| active & (1 << w.group) != 0);
    }

    /// Normalizes and scans one chunk. The chunk goes through the normalizer in slices, so the
    /// batch buffer stays small (a few KiB per thread) whatever the chunk size.
    /// `on_batch` sees each batch of normalized bytes with the original offset of each (the
    /// learned tier's features are computed from them).
    pub(crate) fn feed(
        &mut self,
        a: &WordAutomata,
        chunk: &str,
        found: &mut Vec<Match>,
        mut on_batch: impl FnMut(&[u8], &[u32]),
    ) {
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
                self.scan(a, &b, found);
                on_batch(&b.bytes, &b.starts);
                rest = &rest[cut..];
            }
        });
    }

    /// The end of input: the character the normalizer holds, the closing space, the walkers of
    /// a pending space, then the DFAs' end-of-input transitions.
    pub(crate) fn finish(
        &mut self,
        sc: &WordAutomata,
        found: &mut Vec<Match>,
        on_batch: impl FnOnce(&[u8], &[u32]),
    ) {
        BATCH.with(|b| {
            let mut b = b.borrow_mut();
            b.clear();
            self.norm.finish(&mut *b);
            self.scan(sc, &b, found);
            on_batch(&b.bytes, &b.starts);
        });
        if let Some(at) = take_space(&mut self.pending_space) {
            for (g, group) in sc.anchored.iter().enumerate() {
                if self.active_groups & (1 << g) != 0 {
                    small_room(&mut self.walkers);
                    self.walkers.push(Walker {
                        group: g as u16,
                        sid: group.spawn_state(at),
                        start: at,
                    });
                }
            }
        }
        let view = self.view(&NO_BATCH);
        let mut reported = Vec::new();
        for &w in &self.walkers {
            let g = &sc.anchored[w.group as usize];
            let eoi = g.dfa.next_eoi_state(w.sid);
            walker_matches(sc, &view, w, eoi, self.pos, &mut reported, found);
        }
        for g in 0..sc.dfas.len() {
            let (sid, free) = (self.dfas[g].0, self.dfas[g].1 as u64);
            let eoi = sc.dfas[g].0.fwd.next_eoi_state(sid);
            word_dfa_matches(sc, &view, g, eoi, (self.pos, self.pos, free), found);
        }
        self.walkers.clear();
    }

    /// Original offset before which every output of the normalizer has been emitted.
    pub(crate) fn settled_offset(&self) -> u64 {
        self.norm.settled_offset()
    }

    /// The original offset where the oldest match not yet reported can start, if one can.
    pub(crate) fn oldest_original(&self) -> Option<u64> {
        (self.oldest < self.pos).then(|| self.view(&NO_BATCH).orig_start(self.oldest))
    }

    /// The view's bytes and spans: the tail (older bytes) and `batch` from offset `pos` on.
    fn view<'a>(&'a self, batch: &'a WordBatch) -> WordView<'a> {
        WordView {
            base: self.pos,
            batch,
            tail: &self.tail,
        }
    }

    /// Walks the automata over one batch of normalized bytes, one automaton at a time,
    /// then keeps in the tail what a partial match can still reach.
    fn scan(&mut self, sc: &WordAutomata, b: &WordBatch, found: &mut Vec<Match>) {
        let n = b.bytes.len();
        if n == 0 {
            return;
        }
        let base = self.pos;
        {
            let view = WordView {
                base,
                batch: b,
                tail: &self.tail,
            };
            let mut spawns = Vec::new();
            if let Some(ac) = &sc.ac {
                let at = (self.ac_sid, self.ac_free);
                (self.ac_sid, self.ac_free) = match ac {
                    Phrases::Dfa(a) => phrase_loop(a, sc, &view, at, found, &mut spawns),
                    Phrases::Nfa(a) => phrase_loop(a, sc, &view, at, found, &mut spawns),
                };
            }
            if !sc.anchored.is_empty() {
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
                        // At the text's framing space every group walks (`\A` may match there,
                        // spawn literals or not); elsewhere the groups spawned at word starts.
                        // (A group spawned by literals gets its walker at offset 0 here; the
                        // literal's own spawn, later, finds it and adds none.)
                        let mut m = if at == 0 {
                            active
                                & u64::MAX
                                    .checked_shr(64 - sc.anchored.len() as u32)
                                    .unwrap_or(0)
                        } else {
                            sc.spawn[byte as usize] & active
                        };
                        while m != 0 {
                            let g = m.trailing_zeros() as usize;
                            m &= m - 1;
                            small_room(walkers);
                            walkers.push(Walker {
                                group: g as u16,
                                sid: sc.anchored[g].spawn_state(at),
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
                        let dfa = &sc.anchored[w.group as usize].dfa;
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
            for g in 0..sc.dfas.len() {
                let (sid, free) = self.dfas[g];
                let (sid, free) = dfa_loop(
                    &sc.dfas[g].0,
                    &b.bytes,
                    base,
                    sid,
                    free as u64,
                    |sid, end, free| {
                        word_dfa_matches(sc, &view, g, sid, (end - 1, end, free), found)
                    },
                );
                self.dfas[g] = (sid, free as u32);
            }
        }
        // Keep what a partial match can still reach.
        self.pos = base + n as u64;
        self.oldest = self.oldest(sc);
        let keep_from = keep_from(self.oldest, self.pos, sc.window);
        self.tail.keep(keep_from, base, n, |i| WordCell {
            start: b.starts[i],
            len: b.lens[i],
            byte: b.bytes[i],
        });
    }

    /// The oldest offset a match not yet reported can start at: the phrase automaton's partial
    /// match, a live walker, a pending space, a DFA's partial match.
    ///
    /// Computed after each batch (kept in the field of the same name for the release bound).
    fn oldest(&self, sc: &WordAutomata) -> u64 {
        let mut oldest = self.ac_free.max(self.pos.saturating_sub(sc.ac_max));
        for d in self.dfas.iter() {
            oldest = oldest.min((d.1 as u64).max(self.pos.saturating_sub(sc.dfa_max)));
        }
        for w in &self.walkers {
            oldest = oldest.min(w.start);
        }
        // (NO_SPACE is u64::MAX: no pending space changes nothing.)
        oldest.min(self.pending_space)
    }
}

/// `pending_space` when no space is pending.
const NO_SPACE: u64 = u64::MAX;

/// The pending space's offset, if one is pending; none is after.
fn take_space(at: &mut u64) -> Option<u64> {
    Some(std::mem::replace(at, NO_SPACE)).filter(|&a| a != NO_SPACE)
}

/// One chunk of normalized bytes, with the original span of each (a per-thread scratch buffer).
#[derive(Default)]
pub(crate) struct WordBatch {
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
pub(crate) struct WordCell {
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
            self.tail.v[(n - self.tail.from()) as usize]
        }
    }

    #[inline]
    fn byte(&self, n: u64) -> u8 {
        if n >= self.base {
            self.batch.bytes[(n - self.base) as usize]
        } else {
            self.tail.v[(n - self.tail.from()) as usize].byte
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
/// Walks the phrase automaton over a batch from `(sid, free)`: its state, and the offset at
/// which it was last in its start state. Returns both at the end of the batch. Phrase matches go
/// to `found`; spawn-literal matches to `spawns` as (end, literal, length), in order of end.
fn phrase_loop<A: AcAutomaton>(
    ac: &A,
    sc: &WordAutomata,
    view: &WordView<'_>,
    (mut sid, mut free): (aho_corasick::automaton::StateID, u64),
    found: &mut Vec<Match>,
    spawns: &mut Vec<(u64, u32, u32)>,
) -> (aho_corasick::automaton::StateID, u64) {
    let bytes = &view.batch.bytes[..];
    let stay = &sc.ac_stay[..];
    let mut k = 0;
    while k < bytes.len() {
        if sid == sc.ac_start {
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
                let p = sc.ac_patterns[ac.match_pattern(sid, m).as_usize()];
                if p.trigger & SPAWN != 0 {
                    spawns.push((end, p.trigger & !SPAWN, p.len));
                    continue;
                }
                let start = end - p.len as u64;
                if let Some((os, oe)) = view.span(start + p.lead as u64, end - p.trail as u64) {
                    found.push(Match {
                        trigger: p.trigger,
                        start: os,
                        end: oe,
                    });
                }
            }
        }
    }
    if sid == sc.ac_start {
        free = view.base + bytes.len() as u64;
    }
    (sid, free)
}

/// Reports the matches of a word-view unanchored DFA in state `sid`, ending at `end`; `now` is
/// the word offset scanned so far (the window reaches it, for look-ahead), `free` the DFA's.
fn word_dfa_matches(
    sc: &WordAutomata,
    view: &WordView<'_>,
    group: usize,
    sid: StateID,
    (end, now, free): (u64, u64, u64),
    found: &mut Vec<Match>,
) {
    let (dfa, triggers) = &sc.dfas[group];
    if !dfa.fwd.is_match_state(sid) {
        return;
    }
    let (lo, from) = dfa_window(now, free, sc.dfa_max);
    let window = view.window(lo, now);
    for k in 0..dfa.fwd.match_len(sid) {
        let pid = dfa.fwd.match_pattern(sid, k);
        let trigger = triggers[pid.as_usize()];
        let Some(s) = dfa.find_start(&window, (from - lo) as usize, (end - lo) as usize, pid)
        else {
            continue;
        };
        if let Some((os, oe)) = view.span(lo + s as u64, end) {
            found.push(Match {
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
    sc: &WordAutomata,
    view: &WordView<'_>,
    w: Walker,
    sid: StateID,
    end: u64,
    reported: &mut Vec<(u16, PatternID)>,
    found: &mut Vec<Match>,
) {
    let g = &sc.anchored[w.group as usize];
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
            found.push(Match {
                trigger: g.triggers[pid.as_usize()],
                start: os,
                end: oe,
            });
        }
    }
}
