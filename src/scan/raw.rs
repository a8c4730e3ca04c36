//! The raw view: the caller's bytes, for language-neutral triggers (code, PII, secrets,
//! delimiters).
//!
//! - **Phrases and anchors** share one ASCII-case-insensitive aho-corasick DFA (anchors are then
//!   compared case-sensitively). An anchor is the literal head of a *confirmed* regex
//!   (`anchors` + `regex` in a rule file): once enough bytes after it have arrived (or at the
//!   end of input), a meta regex runs over a bounded window around it ([`confirm_anchor`]).
//!   Anchors of one trigger that start within [`ANCHOR_GROUP`] bytes of the group's first share
//!   one confirmation ([`PendingAnchor`]); the grouping depends only on anchor positions, so
//!   streams and whole texts group alike.
//! - **Regexes** run in dense DFAs with all-matches semantics, one per rule, split in halves
//!   while over [`GROUP_DFA_LIMIT`]; a match's start comes from the reverse DFA.
//!
//! [`RawAutomata`] is what a ruleset compiles to, shared by every stream; [`RawState`] is one
//! stream's walk over it: automaton states, pending anchors, and the tail of bytes that a match
//! not yet reported can still reach ([`RawState::oldest`]).

use super::dfa::{
    ac_depths, ac_stay, build_halving, dfa_loop, dfa_window, DfaAt, RegexDfa, GROUP_DFA_LIMIT,
};
use super::tail::{at, keep_from, small_room, Tail};
use super::ScannerStats;
use crate::rules::{syntax_config, CompiledRuleset, LoadError, TriggerInfo, TriggerKind, View};
use crate::score::Match;
use aho_corasick::automaton::Automaton as AcAutomaton;
use regex_automata::dfa::Automaton as DfaAutomaton;
use regex_automata::util::primitives::StateID;
use regex_automata::{Input, PatternID};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RawKind {
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
pub(crate) struct RawPattern {
    trigger: u32,
    kind: RawKind,
}

/// The raw view's automata, compiled once per ruleset and shared by every stream.
pub(crate) struct RawAutomata {
    /// Regex DFAs: one per rule, split further where a rule's patterns together would exceed
    /// [`GROUP_DFA_LIMIT`]. Each holds (forward pattern id → what it stands for).
    pub(crate) dfas: Vec<(RegexDfa, Vec<RawPattern>)>,
    /// Phrases and anchors: an ASCII case-insensitive aho-corasick DFA (anchors are then
    /// checked case-sensitively). Literals in a dense DFA with all-matches semantics determinize
    /// slowly; aho-corasick builds them in milliseconds.
    ac: Option<aho_corasick::dfa::DFA>,
    ac_patterns: Vec<(RawPattern, Box<[u8]>)>,
    pub(crate) ac_max: u64,
    /// Depth of each phrase automaton state (the length of the partial match it stands for),
    /// by state id shifted right by the second field: where a partial anchor began, looked up
    /// once per chunk.
    ac_depths: (Vec<u8>, u32),
    /// Largest `look_behind` of the confirmed regexes: a match can start this far before its
    /// anchor, so the tail keeps that much more.
    pub(crate) look_behind: u64,
    /// Largest `look_behind` of the confirmed regexes whose hits withhold text and can fire: a
    /// stream's release holds back that much more. (A FLAG trigger's match may start before
    /// what was released; a trigger whose validator can never pass holds nothing.)
    pub(crate) release_look_behind: u64,
    ac_start: aho_corasick::automaton::StateID,
    /// Bytes that keep the phrase automaton in its start state.
    ac_stay: Box<[bool]>,
    /// Confirmation regexes of anchored triggers, by trigger index.
    confirm: Vec<Option<regex_automata::meta::Regex>>,
    /// Whether each trigger's rule withholds text (SANITIZE and above), by trigger index: only
    /// those hold a stream's release back (see [`RawState::release_oldest`]).
    withholds: Vec<bool>,
    /// Whether a pattern of each DFA group withholds text (the group holds the release back).
    dfa_withholds: Vec<bool>,
    /// The most bytes the tail may keep (a power of two): what the longest match, or a
    /// confirmation window, reaches back. A stream keeps less, see [`Tail`].
    pub(crate) window: usize,
    /// Longest match of the regex DFAs (plus the one-byte match delay).
    pub(crate) dfa_max: u64,
    /// policy.toml `[output] image_hosts`, for the `unlisted_host` validator.
    image_hosts: Option<Vec<String>>,
}

impl RawAutomata {
    /// Compiles the raw-view triggers of `rs` (and every anchored trigger), counting them in
    /// `stats`.
    pub(crate) fn build(rs: &CompiledRuleset, stats: &mut ScannerStats) -> Result<Self, LoadError> {
        let fail = |what: &str, e: String| LoadError {
            file: rs.source.clone(),
            line: None,
            message: format!("{what}: {e}"),
        };
        // (rule, forward pattern, what it stands for); reverse ids are assigned per group.
        let mut raw: Vec<(usize, String, RawPattern)> = Vec::new();
        let mut raw_lits: Vec<(RawPattern, Box<[u8]>)> = Vec::new();
        let mut confirm: Vec<Option<regex_automata::meta::Regex>> = vec![None; rs.triggers.len()];
        let mut raw_max = 8usize;
        let mut raw_dfa_max = 0usize;
        for (ti, t) in rs.triggers.iter().enumerate() {
            let ti = ti as u32;
            match (&t.kind, t.view) {
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
                _ => {}
            }
        }
        let trace = std::env::var_os("MISTGUARD_TRACE_BUILD").is_some();
        let t0 = std::time::Instant::now();
        let ac = if raw_lits.is_empty() {
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
        let ac_max = raw_lits.iter().map(|l| l.1.len()).max().unwrap_or(0) as u64;
        let ac_depths = match &ac {
            Some(ac) => ac_depths(ac),
            None => (Vec::new(), 0),
        };
        let look_behind = rs
            .triggers
            .iter()
            .map(|t| match &t.kind {
                TriggerKind::Anchored { look_behind, .. } => *look_behind as u64,
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        let release_look_behind = rs
            .triggers
            .iter()
            .filter(|t| {
                t.action.withholds()
                    && (t.validate != Some(crate::validate::Validator::UnlistedHost)
                        || rs.image_hosts.is_some())
            })
            .map(|t| match &t.kind {
                TriggerKind::Anchored { look_behind, .. } => *look_behind as u64,
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        let ac_start = match &ac {
            Some(ac) => ac
                .start_state(aho_corasick::Anchored::No)
                .map_err(|e| fail("raw-view phrases", e.to_string()))?,
            None => aho_corasick::automaton::StateID::ZERO,
        };
        let mut dfas = Vec::new();
        let mut raw_rules: Vec<usize> = raw.iter().map(|r| r.0).collect();
        raw_rules.sort();
        raw_rules.dedup();
        for rule in raw_rules {
            let group: Vec<(String, RawPattern)> = raw
                .iter()
                .filter(|r| r.0 == rule)
                .map(|r| (r.1.clone(), r.2))
                .collect();
            build_raw_groups(rs, &group, &mut dfas)?;
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
        let ac_stay = match &ac {
            Some(a) => ac_stay(a, ac_start),
            None => vec![true; 256].into_boxed_slice(),
        };
        if trace {
            eprintln!(
                "start-state bytes: raw phrases {}",
                ac_stay.iter().filter(|s| **s).count()
            );
        }
        stats.raw_dfa_bytes = dfas.iter().map(|d| d.0.memory_usage()).sum::<usize>()
            + ac.as_ref().map_or(0, |a| a.memory_usage());
        stats.raw_dfa_groups = dfas.len();
        let window = (raw_max + 2).next_power_of_two();
        for (p, _) in &mut raw_lits {
            if let RawKind::Anchor {
                max_len,
                look_behind,
                span,
                ..
            } = &mut p.kind
            {
                *span = anchor_group_span(window, *max_len as u64, *look_behind as u64) as u32;
            }
        }
        stats.raw_window = window;
        stats.raw_look_behind = release_look_behind as usize;
        // A trigger's own action (the most of its directions'), which may be below its rule's.
        let withholds: Vec<bool> = rs.triggers.iter().map(|t| t.action.withholds()).collect();
        let dfa_withholds = dfas
            .iter()
            .map(|(_, pats)| pats.iter().any(|p| withholds[p.trigger as usize]))
            .collect();
        Ok(RawAutomata {
            withholds,
            dfa_withholds,
            dfas,
            ac,
            ac_patterns: raw_lits,
            ac_max,
            ac_depths,
            look_behind,
            release_look_behind,
            ac_start,
            ac_stay,
            confirm,
            window,
            dfa_max: raw_dfa_max as u64 + 1,
            image_hosts: rs.image_hosts.clone(),
        })
    }

    /// The length of the partial match that phrase automaton state `sid` stands for.
    fn ac_depth(&self, sid: aho_corasick::automaton::StateID) -> u64 {
        let (depths, shift) = &self.ac_depths;
        match depths.get((sid.as_u32() >> shift) as usize) {
            Some(&d) if d < u8::MAX => d as u64,
            _ => self.ac_max,
        }
    }
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

/// Anchors of one confirmed regex that start within [`ANCHOR_GROUP`] bytes of the first,
/// waiting for enough bytes after the last: one confirmation covers them all. (Digits anchor the
/// phone, card and IBAN shapes; one confirmation per digit made numeric text twenty times slower
/// to scan than prose.)
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingAnchor {
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

/// One stream's walk over the raw view.
pub(crate) struct RawState {
    /// Bytes scanned so far.
    pub(crate) pos: u64,
    /// State of each regex DFA, and the offset before which none of its partial matches started.
    dfas: Box<[DfaAt]>,
    ac_sid: aho_corasick::automaton::StateID,
    pub(crate) tail: Tail<u8>,
    /// [`oldest`](Self::oldest) after the last chunk.
    pub(crate) oldest: u64,
    /// Anchors waiting for their confirmation window, by `due`.
    pub(crate) anchors: Vec<PendingAnchor>,
}

impl RawState {
    pub(crate) fn new(a: &RawAutomata) -> RawState {
        RawState {
            pos: 0,
            dfas: a.dfas.iter().map(|d| (d.0.start, 0)).collect(),
            ac_sid: a.ac_start,
            tail: Tail::default(),
            oldest: 0,
            anchors: Vec::new(),
        }
    }

    /// Bytes of the DFA states this stream keeps.
    pub(crate) fn dfa_state_bytes(&self) -> usize {
        self.dfas.len() * std::mem::size_of::<DfaAt>()
    }

    /// Walks the automata over one chunk, one automaton at a time, confirms the anchors whose
    /// window is complete, then keeps in the tail what a match can still reach.
    pub(crate) fn scan(
        &mut self,
        a: &RawAutomata,
        triggers: &[TriggerInfo],
        bytes: &[u8],
        found: &mut Vec<Match>,
    ) {
        let tail = std::mem::take(&mut self.tail);
        let base = self.pos;
        let view = RawView {
            base,
            chunk: bytes,
            tail: &tail,
        };
        if let Some(ac) = &a.ac {
            // Anchors are confirmed as soon as their window is complete, so few are pending.
            let mut sid = self.ac_sid;
            let mut due = self.anchors.first().map_or(u64::MAX, |a| a.due());
            let start = a.ac_start;
            let stay = &a.ac_stay[..];
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
                    self.literals(a, &view, sid, pos, found);
                    due = self.anchors.first().map_or(u64::MAX, |a| a.due());
                }
                if pos >= due {
                    let n = self.anchors.partition_point(|a| a.due() <= pos);
                    for p in self.anchors.drain(..n) {
                        confirm_anchor(a, triggers, &view, p, pos, found);
                    }
                    due = self.anchors.first().map_or(u64::MAX, |a| a.due());
                }
            }
            self.ac_sid = sid;
        }
        for g in 0..a.dfas.len() {
            let (sid, free) = self.dfas[g];
            // One-byte delay: a match state reached on a byte means the match ended before it.
            let (sid, free) = dfa_loop(
                &a.dfas[g].0,
                bytes,
                base,
                sid,
                free as u64,
                |sid, pos, free| {
                    raw_matches(a, triggers, &view, g, sid, (pos - 1, pos, free), found)
                },
            );
            self.dfas[g] = (sid, free as u32);
        }
        let end = base + bytes.len() as u64;
        self.pos = end;
        let due = self.anchors.partition_point(|a| a.due() <= end);
        for p in self.anchors.drain(..due) {
            confirm_anchor(a, triggers, &view, p, end, found);
        }
        self.tail = tail;
        // A burst of digits (anchors of the number shapes) does not keep its room for ever.
        if self.anchors.capacity() > 4 && self.anchors.len() * 2 < self.anchors.capacity() {
            self.anchors
                .shrink_to(self.anchors.len().max(2).next_power_of_two());
        }
        self.oldest = self.oldest(a);
        let keep_from = keep_from(self.oldest, self.pos, a.window);
        self.tail.keep(keep_from, base, bytes.len(), |i| bytes[i]);
    }

    /// The end of input: the DFAs' end-of-input transitions and every pending anchor.
    pub(crate) fn finish(
        &mut self,
        a: &RawAutomata,
        triggers: &[TriggerInfo],
        found: &mut Vec<Match>,
    ) {
        let view = RawView {
            base: self.pos,
            chunk: &[],
            tail: &self.tail,
        };
        for g in 0..a.dfas.len() {
            let (sid, free) = (self.dfas[g].0, self.dfas[g].1 as u64);
            let eoi = a.dfas[g].0.fwd.next_eoi_state(sid);
            raw_matches(
                a,
                triggers,
                &view,
                g,
                eoi,
                (self.pos, self.pos, free),
                found,
            );
        }
        for p in self.anchors.drain(..) {
            confirm_anchor(a, triggers, &view, p, self.pos, found);
        }
    }

    /// The oldest offset a match not yet reported can start at: a DFA's partial match, a
    /// pending anchor's look-behind, or the look-behind of an anchor the phrase automaton may
    /// still complete.
    ///
    /// Computed after each chunk (kept in the field of the same name for the release bound).
    fn oldest(&self, a: &RawAutomata) -> u64 {
        let mut r = self.pos;
        for d in self.dfas.iter() {
            r = r.min((d.1 as u64).max(self.pos.saturating_sub(a.dfa_max)));
        }
        // An anchor not seen yet starts where the phrase automaton's partial match does; its match
        // may begin up to the largest look-behind before it.
        let partial = self.pos - a.ac_depth(self.ac_sid);
        r = r.min(partial.saturating_sub(a.look_behind));
        for p in &self.anchors {
            r = r.min(p.first().saturating_sub(p.look_behind as u64));
        }
        r
    }

    /// The oldest offset a match of a rule that withholds text (SANITIZE and above) can still
    /// start at: [`oldest`](Self::oldest) without the pending anchors and DFA partial matches of
    /// rules that only flag or warn. A stream's release waits for those matches only: a WARN or
    /// FLAG hit found later never takes back text the client has shown. (A prose `here ` is an
    /// anchor of the SQL-concatenation trigger, which waits for 256 bytes after it.)
    pub(crate) fn release_oldest(&self, a: &RawAutomata) -> u64 {
        let mut r = self.pos;
        for (d, &withholds) in self.dfas.iter().zip(&a.dfa_withholds) {
            if withholds {
                r = r.min((d.1 as u64).max(self.pos.saturating_sub(a.dfa_max)));
            }
        }
        let partial = self.pos - a.ac_depth(self.ac_sid);
        r = r.min(partial.saturating_sub(a.release_look_behind));
        for p in &self.anchors {
            if a.withholds[p.trigger as usize] {
                r = r.min(p.first().saturating_sub(p.look_behind as u64));
            }
        }
        r
    }

    /// Reports the phrases and anchors of the aho-corasick match state `sid` reached at `end`.
    fn literals(
        &mut self,
        a: &RawAutomata,
        view: &RawView<'_>,
        sid: aho_corasick::automaton::StateID,
        end: u64,
        found: &mut Vec<Match>,
    ) {
        let Some(ac) = &a.ac else {
            return;
        };
        for k in 0..ac.match_len(sid) {
            let pid = ac.match_pattern(sid, k);
            let (p, bytes) = &a.ac_patterns[pid.as_usize()];
            match p.kind {
                RawKind::Literal { len } => found.push(Match {
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
                    let mut pending = PendingAnchor {
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
                        pending = g;
                    }
                    let at = self.anchors.partition_point(|x| x.due() <= pending.due());
                    small_room(&mut self.anchors);
                    self.anchors.insert(at, pending);
                }
                RawKind::Regex { .. } => {}
            }
        }
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

/// Reports the raw-view regex matches of a match state, ending at `end`; `now` is the offset
/// scanned so far (the window reaches it), `free` the DFA's (see [`dfa_window`]).
fn raw_matches(
    a: &RawAutomata,
    triggers: &[TriggerInfo],
    view: &RawView<'_>,
    group: usize,
    sid: StateID,
    (end, now, free): (u64, u64, u64),
    found: &mut Vec<Match>,
) {
    let (dfa, patterns) = &a.dfas[group];
    if !dfa.fwd.is_match_state(sid) {
        return;
    }
    let (lo, from) = dfa_window(now, free, a.dfa_max);
    let window = view.window(lo, now);
    for k in 0..dfa.fwd.match_len(sid) {
        let pid = dfa.fwd.match_pattern(sid, k);
        let p = patterns[pid.as_usize()];
        let t = &triggers[p.trigger as usize];
        let RawKind::Regex { rev } = p.kind else {
            continue;
        };
        let Some(s) = dfa.find_start(&window, (from - lo) as usize, (end - lo) as usize, rev)
        else {
            continue;
        };
        if let Some(v) = t.validate {
            if !v.check(&window[s..(end - lo) as usize], a.image_hosts.as_deref()) {
                continue;
            }
        }
        found.push(Match {
            trigger: p.trigger,
            start: lo + s as u64,
            end,
        });
    }
}

/// Runs an anchored trigger's regex over the window around its anchor; `raw_pos` is the offset
/// scanned so far.
fn confirm_anchor(
    automata: &RawAutomata,
    triggers: &[TriggerInfo],
    view: &RawView<'_>,
    a: PendingAnchor,
    raw_pos: u64,
    found: &mut Vec<Match>,
) {
    let t = &triggers[a.trigger as usize];
    let TriggerKind::Anchored {
        max_len,
        look_behind,
        ..
    } = &t.kind
    else {
        return;
    };
    let Some(re) = automata.confirm[a.trigger as usize].as_ref() else {
        return;
    };
    // The window ends where it is complete (`due`), or at the end of input if that comes first.
    let now = raw_pos.min(a.due());
    let ring = automata.window as u64;
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
    let value = re
        .group_info()
        .to_index(regex_automata::PatternID::ZERO, VALUE_GROUP);
    match value {
        None => {
            for m in re.find_iter(input) {
                report_confirmed(
                    automata.image_hosts.as_deref(),
                    t,
                    a,
                    (lo, &window),
                    (m.range(), m.range()),
                    found,
                );
            }
        }
        // The hit is the value alone (the keyword and context around it stay).
        Some(g) => {
            for caps in re.captures_iter(input) {
                let Some(m) = caps.get_match() else { continue };
                let v = caps.get_group(g).map_or(m.range(), |v| v.range());
                report_confirmed(
                    automata.image_hosts.as_deref(),
                    t,
                    a,
                    (lo, &window),
                    (m.range(), v),
                    found,
                );
            }
        }
    }
}

/// The capture group of a confirming regex that is the hit's span (see rulesets/README.md).
pub const VALUE_GROUP: &str = "v";

/// Reports a confirming regex's match `m` (the hit's span: `v`) when an anchor of the group
/// starts in it and the validator takes the value.
/// `(lo, window)`: the bytes the regex ran over, and the stream offset of the first.
fn report_confirmed(
    hosts: Option<&[String]>,
    t: &TriggerInfo,
    a: PendingAnchor,
    (lo, window): (u64, &[u8]),
    (m, v): (std::ops::Range<usize>, std::ops::Range<usize>),
    found: &mut Vec<Match>,
) {
    let (s, e) = (lo + m.start as u64, lo + m.end as u64);
    if !a.starts_in(s, e) || v.is_empty() {
        return;
    }
    if let Some(check) = t.validate {
        if !check.check(&window[v.clone()], hosts) {
            return;
        }
    }
    found.push(Match {
        trigger: a.trigger,
        start: lo + v.start as u64,
        end: lo + v.end as u64,
    });
}
