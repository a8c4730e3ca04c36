//! One text or stream's scan ([`ScanSession`]): both views walked chunk by chunk, the language
//! decided from the first bytes, the hits given to their rules' scores, and the release offset.
//!
//! The session knows the compiled automata ([`Scanner`]) and the ruleset, which the caller
//! passes with each chunk; it knows nothing of how a verdict is worded or reported (that is the
//! engine's, through `decide`). Each step answers with a [`ScanStep`]: the action so far, the
//! matches that became reportable, and the offset before which the stream may be released.
//!
//! Invariants kept here:
//! - the language depends only on the first [`PROBE_BYTES`] bytes, and is decided before the
//!   chunk that completes them is scanned; language triggers found before it wait for it;
//! - a step gives its matches to their rules by start, each after its rule decided the windows
//!   that end before it (the *hit floor*: every match still to be found starts at or after it),
//!   so whole texts and streams agree and a rule holds about one window of matches;
//! - the release offset never decreases and never passes a partial match, a pending anchor, a
//!   match waiting for the language, or a held match of a rule whose action withholds text.

use super::clean::CleanMap;
use super::raw::{PendingAnchor, RawState};
use super::tail::TAIL_IDLE_UPDATES;
use super::word::{Walker, WordState};
use super::Scanner;
use crate::action::Action;
use crate::lang::{self, LangSet, NEUTRAL, PROBE_BYTES};
use crate::learned::{Learned, LearnedState};
use crate::rules::CompiledRuleset;
use crate::score::{Match, RuleState};

/// What one step of a scan found.
#[derive(Debug)]
pub struct ScanStep {
    /// The verdict so far (most severe action of every rule fired up to now).
    pub action: Action,
    /// Matches that became reportable in this step (new, or held ones whose rule fired), in the
    /// order the rules gave them.
    pub found: Vec<Match>,
    /// Bytes of the stream the client may forward now. Never decreases.
    pub release_offset: u64,
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
    waiting: Vec<Match>,
}

/// The scan of one text or stream. See the module docs.
pub struct ScanSession {
    raw: RawState,
    /// The raw view reads the text with invisible characters removed and fullwidth forms
    /// folded (`clean.rs`); its offsets map back through this.
    clean: CleanMap,
    word: WordState,
    /// The learned tier's features and windows (when the engine has one).
    learned: Option<Box<LearnedState>>,
    lang: LangState,
    /// Score of each rule with a hit so far, by rule index (ascending): a fresh stream holds none.
    rules: Vec<(usize, RuleState)>,
    action: Action,
    /// Chunks in a row that left no pending anchor and no walker: at [`TAIL_IDLE_UPDATES`] the
    /// room of both lists is given back.
    lists_idle: u8,
    released: u64,
    /// The direction's index ([`crate::verdict::Direction::index`]): which triggers apply, and
    /// with which action.
    dir: usize,
    /// The last chunk was fed: no more may come.
    fed_last: bool,
    finished: bool,
}

thread_local! {
    /// Scratch room for a chunk's cleaned copy (`clean.rs`).
    static CLEAN_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The hit floors of one step (see `ScanSession::hit_floors`).
#[derive(Clone, Copy)]
struct Floors {
    rules: u64,
    learned: u64,
}

impl Floors {
    /// The floor of rule `rule`: the learned tier's when its hits add to the rule's score.
    fn of(&self, rule: usize, lt: Option<&Learned>) -> u64 {
        match lt {
            Some(lt) if lt.adds_to(rule) => self.learned,
            _ => self.rules,
        }
    }
}

/// Decides the windows of rule `rule` (state `st`) that end before `floor`; a rule that fires
/// reports its held hits in `out`.
fn settle_rule(
    rs: &CompiledRuleset,
    rule: usize,
    st: &mut RuleState,
    floor: u64,
    out: &mut Vec<Match>,
) {
    let r = &rs.rules[rule];
    let triggers = &rs.triggers;
    st.settle(
        floor,
        r.window,
        r.threshold,
        |t| triggers[t as usize].weight,
        out,
    );
}

impl ScanSession {
    /// A fresh scan; `lang_hint` (a supported ISO 639-1 code) decides the language at once.
    /// `learned`: the engine's learned tier, if any (pass the same one to every call).
    pub fn new(
        sc: &Scanner,
        learned: Option<&Learned>,
        lang_hint: Option<&str>,
        direction: crate::verdict::Direction,
    ) -> ScanSession {
        let lang = match lang_hint.and_then(LangSet::from_hint) {
            Some(set) => LangState::Decided(set),
            None => LangState::Probing(Box::default()),
        };
        let mut s = ScanSession {
            raw: RawState::new(&sc.raw),
            clean: CleanMap::default(),
            word: WordState::new(&sc.word),
            learned: learned.map(|_| Box::new(LearnedState::new())),
            lang,
            rules: Vec::new(),
            action: Action::Allow,
            lists_idle: 0,
            released: 0,
            dir: direction.index(),
            fed_last: false,
            finished: false,
        };
        if let LangState::Decided(set) = &s.lang {
            s.word.set_languages(&sc.word, set);
        }
        s
    }

    /// Bytes fed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.clean.orig_pos
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The verdict so far.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The languages whose triggers apply, once decided.
    pub fn lang_set(&self) -> Option<&LangSet> {
        match &self.lang {
            LangState::Decided(s) => Some(s),
            LangState::Probing(_) => None,
        }
    }

    /// The language settled on (hint or detection), once decided.
    pub fn language(&self) -> Option<&'static str> {
        self.lang_set().and_then(|s| s.primary).map(lang::code)
    }

    /// Each fired rule (index into the ruleset's rules) with its score.
    pub fn fired_rules(&self) -> impl Iterator<Item = (usize, f32)> + '_ {
        self.rules
            .iter()
            .filter(|(_, r)| r.fired)
            .map(|(i, r)| (*i, r.score))
    }

    /// What the scan's state is made of, part by part, in bytes (heap parts by capacity).
    pub fn state_parts(&self) -> Vec<(&'static str, usize)> {
        use std::mem::size_of;
        vec![
            ("struct", size_of::<Self>()),
            ("raw tail", self.raw.tail.bytes()),
            ("raw clean map", self.clean.state_bytes()),
            ("word tail", self.word.tail.bytes()),
            (
                "DFA states",
                self.word.dfa_state_bytes() + self.raw.dfa_state_bytes(),
            ),
            (
                "walkers",
                self.word.walkers.capacity() * size_of::<Walker>(),
            ),
            (
                "pending anchors",
                self.raw.anchors.capacity() * size_of::<PendingAnchor>(),
            ),
            (
                "language",
                match &self.lang {
                    LangState::Probing(p) => {
                        size_of::<Probe>()
                            + p.buf.capacity()
                            + p.waiting.capacity() * size_of::<Match>()
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
                            r.seen.capacity() * 4 + r.held.capacity() * size_of::<Match>()
                        })
                        .sum::<usize>(),
            ),
        ]
    }

    /// Scans one chunk; `last` says no more chunks follow (see
    /// `StreamSession::feed_last`).
    ///
    /// # Panics
    /// If the stream grows past 4 GiB (offsets are kept in 32 bits; the daemon caps streams far
    /// lower), or after the last chunk or [`finish`](Self::finish).
    pub fn feed(
        &mut self,
        sc: &Scanner,
        rs: &CompiledRuleset,
        lt: Option<&Learned>,
        chunk: &str,
        last: bool,
    ) -> ScanStep {
        assert!(!self.fed_last, "feed after feed_last");
        self.fed_last = last;
        assert!(!self.finished, "feed after finish");
        assert!(
            self.clean.orig_pos + chunk.len() as u64 <= u32::MAX as u64,
            "a stream is limited to 4 GiB"
        );
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
            && (last || self.clean.orig_pos + chunk.len() as u64 >= PROBE_BYTES as u64)
        {
            found = self.decide_language(sc);
        }
        CLEAN_BUF.with(|buf| {
            let buf = &mut *buf.borrow_mut();
            let bytes = if self.clean.clean(chunk, buf) {
                &buf[..]
            } else {
                chunk.as_bytes()
            };
            let from = found.len();
            self.raw.scan(&sc.raw, &rs.triggers, bytes, &mut found);
            self.map_raw(&mut found[from..]);
        });
        let learned = self.learned.as_deref_mut().zip(lt);
        match learned {
            Some((st, lt)) => {
                self.word.feed(&sc.word, chunk, &mut found, |b, s| {
                    st.consume(&lt.table, b, s)
                });
                let settled = self.word.settled_offset();
                st.decide(&lt.table, &lt.model, settled, None, |s, e, p| {
                    lt.window_matches(s, e, &p, &mut found)
                });
            }
            None => self.word.feed(&sc.word, chunk, &mut found, |_, _| {}),
        }
        let mut out = Vec::new();
        self.accept_all(rs, lt, found, &mut out);
        if self.raw.anchors.is_empty() && self.word.walkers.is_empty() {
            self.lists_idle = self.lists_idle.saturating_add(1);
            if u32::from(self.lists_idle) >= TAIL_IDLE_UPDATES
                && self.raw.anchors.capacity() + self.word.walkers.capacity() > 0
            {
                self.raw.anchors = Vec::new();
                self.word.walkers = Vec::new();
            }
        } else {
            self.lists_idle = 0;
        }
        self.step(sc, rs, lt, out)
    }

    /// Applies the end of input: pending look-ahead, anchors and the DFAs' end-of-input
    /// transitions. Returns the final step (an empty one when called again).
    pub fn finish(&mut self, sc: &Scanner, rs: &CompiledRuleset, lt: Option<&Learned>) -> ScanStep {
        if self.finished {
            return self.step(sc, rs, lt, Vec::new());
        }
        let mut found = Vec::new();
        self.raw.finish(&sc.raw, &rs.triggers, &mut found);
        self.map_raw(&mut found);
        let end = self.clean.orig_pos;
        match self.learned.as_deref_mut().zip(lt) {
            Some((st, lt)) => {
                st.set_end(end);
                self.word
                    .finish(&sc.word, &mut found, |b, s| st.consume(&lt.table, b, s));
                st.decide(&lt.table, &lt.model, u64::MAX, Some(end), |s, e, p| {
                    lt.window_matches(s, e, &p, &mut found)
                });
            }
            None => self.word.finish(&sc.word, &mut found, |_, _| {}),
        }
        if matches!(self.lang, LangState::Probing(_)) {
            found.extend(self.decide_language(sc));
        }
        self.finished = true;
        let mut out = Vec::new();
        self.accept_all(rs, lt, found, &mut out);
        self.step(sc, rs, lt, out)
    }

    /// Decides the language from the probe; returns the triggers found meanwhile.
    fn decide_language(&mut self, sc: &Scanner) -> Vec<Match> {
        let mut waiting = Vec::new();
        if let LangState::Probing(p) = &mut self.lang {
            waiting = std::mem::take(&mut p.waiting);
            let set = LangSet::detect(&p.buf);
            self.word.set_languages(&sc.word, &set);
            self.lang = LangState::Decided(set);
        }
        waiting
    }

    /// Gives the hits found by one step (and those that waited for the language) to their rules,
    /// by start, after the language check. Before a hit is added, its rule decides the windows
    /// that end before the hit's start: no hit still to come starts earlier, whether later in
    /// this batch (sorted) or in a later chunk (the hit floor). So a rule holds the hits of
    /// about one window, however many a single step brings, and whole texts and streams agree.
    /// Hits that become reportable go to `out`.
    fn accept_all(
        &mut self,
        rs: &CompiledRuleset,
        lt: Option<&Learned>,
        mut found: Vec<Match>,
        out: &mut Vec<Match>,
    ) {
        if found.is_empty() {
            return;
        }
        found.sort_unstable_by_key(|f| (f.start, f.end, f.trigger));
        let floors = self.hit_floors();
        for f in found {
            self.accept(rs, lt, f, floors, out);
        }
    }

    fn accept(
        &mut self,
        rs: &CompiledRuleset,
        lt: Option<&Learned>,
        f: Match,
        floors: Floors,
        out: &mut Vec<Match>,
    ) {
        let t = &rs.triggers[f.trigger as usize];
        if !t.directions[self.dir] {
            return;
        }
        // English triggers apply whatever the language turns out to be (like neutral ones), so
        // only the other languages' triggers wait for the decision.
        if t.lang != NEUTRAL && t.lang != lang::ENGLISH {
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
        if t.standalone {
            out.push(f);
            return;
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
        let floor = floors.of(t.rule, lt).min(f.start);
        let st = &mut self.rules[i].1;
        settle_rule(rs, t.rule, st, floor, out);
        st.add(f, t.weight, out);
    }

    /// Decides the rules' windows that end before their hit floor (all of them once the stream
    /// is finished); a rule that fires reports its hits in `out`.
    fn settle_rules(
        &mut self,
        rs: &CompiledRuleset,
        lt: Option<&Learned>,
        floors: Floors,
        out: &mut Vec<Match>,
    ) {
        for (i, st) in &mut self.rules {
            if st.held.is_empty() {
                continue;
            }
            settle_rule(rs, *i, st, floors.of(*i, lt), out);
            if self.finished {
                st.held = Vec::new();
            }
        }
    }

    fn step(
        &mut self,
        sc: &Scanner,
        rs: &CompiledRuleset,
        lt: Option<&Learned>,
        mut found: Vec<Match>,
    ) -> ScanStep {
        // One pair of hit floors per step for the windows (scoring does not move them).
        let floors = self.hit_floors();
        self.settle_rules(rs, lt, floors, &mut found);
        // The verdict is the most severe action of the hits reported: a rule's, or the lower
        // one a trigger of it sets.
        for f in &found {
            self.action = self
                .action
                .max(rs.triggers[f.trigger as usize].actions[self.dir]);
        }
        let release = if self.finished {
            self.clean.orig_pos
        } else {
            self.release_bound(sc, rs, lt)
        };
        self.released = self.released.max(release);
        ScanStep {
            action: self.action,
            found,
            release_offset: self.released,
        }
    }

    /// The original offset before which no text can be released: no trigger of a rule that
    /// withholds text (SANITIZE and above) can still complete a match before it, and no held
    /// hit of such a rule before it can still be reported. FLAG and WARN matches never hold a
    /// stream back: their hits may point into text already released, which they do not change.
    fn release_bound(&self, sc: &Scanner, rs: &CompiledRuleset, lt: Option<&Learned>) -> u64 {
        let mut r = self.floor(self.clean.start(self.raw.release_oldest(&sc.raw)));
        // In `hold` mode the release also waits for the learned tier's undecided windows.
        if let (Some(st), Some(lt)) = (&self.learned, lt) {
            if lt.holds_release(rs) {
                r = r.min(st.undecided_from());
            }
        }
        // Hits held below threshold by a rule whose action withholds text.
        for (i, st) in &self.rules {
            if !st.fired && rs.rules[*i].action.withholds() {
                if let Some(start) = st.held_start() {
                    r = r.min(start);
                }
            }
        }
        r
    }

    /// The original offsets before which no trigger can still complete a match: every hit not
    /// yet given to a rule (still to be found, or waiting for the language) starts at or after
    /// them. The second also waits for the learned tier's undecided windows, for the rules whose
    /// score its hits add to. Once the stream is finished, nothing is still to come.
    fn hit_floors(&self) -> Floors {
        if self.finished {
            return Floors {
                rules: u64::MAX,
                learned: u64::MAX,
            };
        }
        let rules = self.floor(self.clean.start(self.raw.oldest));
        let learned = match &self.learned {
            Some(st) => rules.min(st.undecided_from()),
            None => rules,
        };
        Floors { rules, learned }
    }

    /// Maps the raw view's matches from cleaned offsets to the caller's, and forgets the map
    /// before what the raw view can still report.
    fn map_raw(&mut self, found: &mut [Match]) {
        for f in found.iter_mut() {
            let (s, e) = (self.clean.start(f.start), self.clean.end(f.end));
            f.start = s;
            f.end = e;
        }
        self.clean
            .forget_before(self.raw.oldest.min(self.raw.tail.from()));
    }

    /// The hit floor of the rules, with the raw view's oldest offset given (all of its partial
    /// matches, or those of withholding rules only).
    fn floor(&self, raw_oldest: u64) -> u64 {
        // A partial match is never older than the longest pattern (plus the DFA's one-byte delay).
        let mut r = raw_oldest;
        r = r.min(self.word.settled_offset());
        // Word view: the oldest live partial match.
        if let Some(start) = self.word.oldest_original() {
            r = r.min(start);
        }
        // Hits waiting for the language.
        if let LangState::Probing(p) = &self.lang {
            for f in &p.waiting {
                r = r.min(f.start);
            }
        }
        r
    }
}
