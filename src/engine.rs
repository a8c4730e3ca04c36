//! The public face of the core: a compiled ruleset that classifies whole texts and streams.
//!
//! [`Engine`] owns the ruleset and its automata; a [`StreamSession`] is one text or stream: the
//! scan (`scan::ScanSession`) plus what the caller is told (hits with their rule and trigger ids,
//! the message of the verdict, the sanitized text), composed through `decide`.

use crate::action::Action;
use crate::decode::{Codec, DecodeTracker, Segment};
use crate::leak::LeakTracker;
use crate::learned::{Learned, Model};
use crate::rules::{CompiledRuleset, LoadError};
use crate::scan::{ScanSession, ScanStep, Scanner};
use crate::score::Match;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

pub use crate::verdict::{ClassifyOptions, Direction, Hit, LeakOptions, StepResult, Verdict};

/// A compiled ruleset, shareable across threads (`Arc<Engine>`).
pub struct Engine {
    pub(crate) rules: CompiledRuleset,
    pub(crate) scanner: Scanner,
    /// The learned tier, when a model is attached and one of its heads is in use.
    pub(crate) learned: Option<Learned>,
    /// Messages already composed, by (language, distinct triggers in the order reported): a
    /// stream points to its message here instead of holding a copy (see [`Engine::message`]).
    messages: dashmap::DashMap<MessageKey, Arc<str>>,
    /// The closing regex of each region trigger, by trigger index.
    regions: Vec<Option<regex_automata::meta::Regex>>,
    /// The triggers that stand for leaks of protected texts and canaries (rule LEAK).
    leak_triggers: [Option<u32>; 2],
    /// Key of the hashed placeholders (random per engine unless set).
    placeholder_key: [u8; 32],
}

/// What a message is made of: the language and the distinct triggers, in the order reported.
type MessageKey = (Option<&'static str>, Box<[u32]>);

/// Most messages the engine keeps composed; past it, a message is composed for its stream alone.
pub const MESSAGE_CACHE_ENTRIES: usize = 4096;

impl Engine {
    /// Loads and compiles the rulesets in `dir` (rules only: no learned tier).
    ///
    /// # Errors
    /// A [`LoadError`] naming the file, the line and the reason.
    pub fn from_dir(dir: &Path) -> Result<Engine, LoadError> {
        let rules = crate::load::ruleset_dir(dir)?;
        Engine::from_ruleset(rules)
    }

    /// The rulesets and the model embedded in the binary at build time (`rulesets/`,
    /// `models/`): what the daemon serves by default.
    pub fn bundled() -> Result<Engine, LoadError> {
        let rules = crate::rules::load_bundled()?;
        Engine::new(rules, Some(Arc::new(crate::learned::bundled())))
    }

    /// A ruleset alone, without the learned tier.
    pub fn from_ruleset(rules: CompiledRuleset) -> Result<Engine, LoadError> {
        Engine::from_ruleset_with(rules, &crate::scan::ScanConfig::default())
    }

    /// A ruleset with a model beside it (`None`: rules only). The model's heads act for the
    /// rules the ruleset has and lets act (policy.toml `model`).
    pub fn new(mut rules: CompiledRuleset, model: Option<Arc<Model>>) -> Result<Engine, LoadError> {
        let learned = model.and_then(|m| crate::learned::attach(&mut rules, m));
        let scanner = Scanner::build(&rules)?;
        Engine::assemble(rules, scanner, learned)
    }

    fn assemble(
        rules: CompiledRuleset,
        scanner: Scanner,
        learned: Option<Learned>,
    ) -> Result<Engine, LoadError> {
        let mut regions = Vec::with_capacity(rules.triggers.len());
        for t in &rules.triggers {
            regions.push(match &t.region {
                None => None,
                Some(r) => Some(
                    regex_automata::meta::Regex::builder()
                        .syntax(crate::rules::syntax_config(crate::rules::View::Raw))
                        .build(&r.until)
                        .map_err(|e| LoadError {
                            file: t.file.to_string(),
                            line: Some(t.line),
                            message: format!("until `{}`: {e}", r.until),
                        })?,
                ),
            });
        }
        let leak_of = |k| {
            rules
                .triggers
                .iter()
                .position(|t| matches!(t.kind, crate::rules::TriggerKind::Leak(x) if x == k))
                .map(|i| i as u32)
        };
        let leak_triggers = [
            leak_of(crate::leak::LeakKind::Shingles),
            leak_of(crate::leak::LeakKind::Canary),
        ];
        let mut placeholder_key = [0u8; 32];
        // Without the system's random source the hashes are still keyed, by the clock's nanos.
        if getrandom::fill(&mut placeholder_key).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            placeholder_key = *blake3::hash(&t.to_le_bytes()).as_bytes();
        }
        Ok(Engine {
            rules,
            scanner,
            learned,
            messages: dashmap::DashMap::new(),
            regions,
            leak_triggers,
            placeholder_key,
        })
    }

    /// Sets the key of hashed placeholders (`[EMAIL:1f2e3d4c5b6a]`), so that hashes agree
    /// across restarts and replicas (the daemon derives it from `subject_key_file`).
    pub fn set_placeholder_key(&mut self, key: [u8; 32]) {
        self.placeholder_key = key;
    }

    /// Whether the rulesets have the LEAK rule's triggers (protected texts, canaries).
    pub fn finds_leaks(&self) -> bool {
        self.leak_triggers.iter().any(Option::is_some)
    }

    /// [`Engine::from_ruleset`] with the scanner's build choices (which change its speed, not
    /// its results).
    pub fn from_ruleset_with(
        rules: CompiledRuleset,
        config: &crate::scan::ScanConfig,
    ) -> Result<Engine, LoadError> {
        let scanner = Scanner::build_with(&rules, config)?;
        Engine::assemble(rules, scanner, None)
    }

    /// The learned tier, if the engine has one.
    pub fn learned(&self) -> Option<&Learned> {
        self.learned.as_ref()
    }

    /// The version of the learned tier's model (`None`: the rules alone).
    pub fn model_version(&self) -> Option<&str> {
        self.learned.as_ref().map(|l| l.model.version.as_str())
    }

    /// The message of a verdict (see [`crate::decide::message`]), shared: streams that reported
    /// the same triggers in the same language point to one copy. The bool is true when the copy
    /// is the engine's (false once [`MESSAGE_CACHE_ENTRIES`] messages are kept: then it is the
    /// caller's own).
    pub fn message(
        &self,
        action: Action,
        triggers: &[u32],
        language: Option<&'static str>,
    ) -> Option<(Arc<str>, bool)> {
        if action == Action::Allow {
            return None;
        }
        let key = (language, Box::<[u32]>::from(triggers));
        if let Some(m) = self.messages.get(&key) {
            return Some((m.clone(), true));
        }
        let m: Arc<str> = crate::decide::message(&self.rules, action, triggers, language)?.into();
        if self.messages.len() < MESSAGE_CACHE_ENTRIES {
            self.messages.insert(key, m.clone());
            return Some((m, true));
        }
        Some((m, false))
    }

    /// The `version` from policy.toml.
    pub fn version(&self) -> &str {
        &self.rules.version
    }

    pub fn ruleset(&self) -> &CompiledRuleset {
        &self.rules
    }

    pub fn scanner(&self) -> &Scanner {
        &self.scanner
    }

    /// Classifies a whole text: the same as one stream fed the whole text and finished.
    pub fn classify(self: &Arc<Self>, text: &str, opts: &ClassifyOptions) -> Verdict {
        let mut session = StreamSession::new(self.clone(), opts);
        session.feed_last(text);
        session.finish();
        session.verdict(Some(text))
    }

    /// Opens a stream.
    pub fn session(self: &Arc<Self>, opts: &ClassifyOptions) -> StreamSession {
        StreamSession::new(self.clone(), opts)
    }

    /// Scans every string value of a tool call's arguments (nested ones included) as a text of
    /// its own, in the direction `opts` gives (the daemon: [`Direction::ToolArguments`]). Each
    /// hit comes with the JSON path of its value (`$.statement`, `$.rows[2]["a b"]`); its span
    /// counts from the start of that value. At most [`MAX_ARGUMENT_STRINGS`] values, nested at
    /// most [`MAX_ARGUMENT_DEPTH`] deep, are scanned; what lies beyond is counted in
    /// `unscanned`.
    pub fn scan_arguments(
        self: &Arc<Self>,
        args: &serde_json::Value,
        opts: &ClassifyOptions,
    ) -> ArgumentScan {
        let mut out = ArgumentScan::default();
        let mut path = String::from("$");
        self.scan_value(args, opts, &mut path, 0, &mut out);
        out
    }

    fn scan_value(
        self: &Arc<Self>,
        v: &serde_json::Value,
        opts: &ClassifyOptions,
        path: &mut String,
        depth: usize,
        out: &mut ArgumentScan,
    ) {
        use serde_json::Value;
        match v {
            Value::String(s) => {
                if out.scanned >= MAX_ARGUMENT_STRINGS {
                    out.unscanned += 1;
                    return;
                }
                out.scanned += 1;
                let verdict = self.classify(s, opts);
                out.action = out.action.max(verdict.action);
                for h in verdict.hits {
                    if !out.rules.contains(&h.rule_id) {
                        out.rules.push(h.rule_id.clone());
                    }
                    out.hits.push(ArgumentHit {
                        json_path: path.clone(),
                        hit: h,
                    });
                }
            }
            Value::Array(items) if depth < MAX_ARGUMENT_DEPTH => {
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    self.scan_value(item, opts, path, depth + 1, out);
                    path.truncate(len);
                }
            }
            Value::Object(map) if depth < MAX_ARGUMENT_DEPTH => {
                for (k, item) in map {
                    let len = path.len();
                    let plain = !k.is_empty()
                        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                        && !k.as_bytes()[0].is_ascii_digit();
                    if plain {
                        path.push('.');
                        path.push_str(k);
                    } else {
                        path.push('[');
                        path.push_str(&serde_json::Value::String(k.clone()).to_string());
                        path.push(']');
                    }
                    self.scan_value(item, opts, path, depth + 1, out);
                    path.truncate(len);
                }
            }
            Value::Array(_) | Value::Object(_) => out.unscanned += 1,
            _ => {}
        }
    }
}

/// Most string values of a tool call's arguments [`Engine::scan_arguments`] scans.
pub const MAX_ARGUMENT_STRINGS: usize = 10_000;
/// Deepest nesting of a tool call's arguments [`Engine::scan_arguments`] walks.
pub const MAX_ARGUMENT_DEPTH: usize = 64;

/// A hit in a tool call's arguments.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ArgumentHit {
    /// The JSON path of the string value the hit is in.
    pub json_path: String,
    /// The hit; its span counts from the start of that value.
    pub hit: Hit,
}

/// What the content scan of a tool call's arguments found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ArgumentScan {
    pub hits: Vec<ArgumentHit>,
    /// The most severe action of the hits (ALLOW when none).
    pub action: Action,
    /// The distinct rule ids hit, in the order found.
    pub rules: Vec<Arc<str>>,
    /// String values scanned, and values left out (past the bounds).
    pub scanned: usize,
    pub unscanned: usize,
}

/// Most hits a stream keeps for its final verdict.
pub const MAX_KEPT_HITS: usize = 4096;

/// Levels of decoding: a text, what was decoded from it, and what was decoded from that. A
/// segment at the last level is scanned but not decoded again.
pub const MAX_DECODE_DEPTH: u8 = 2;

/// One text or stream: its scan, and what it has reported (for the messages and the verdict).
pub struct StreamSession {
    engine: Arc<Engine>,
    scan: ScanSession,
    /// What was reported, from the first hit on (a stream without hits holds none of it).
    reported: Option<Box<Reported>>,
    keep_hits: bool,
    /// Encoded runs (base64, hex, URL, HTML entities, tag characters, rot13, reversed text)
    /// found so far; `None` at the last decoding level.
    decode: Option<Box<DecodeTracker>>,
    /// How many decodings lie between the caller's text and this one (0: the caller's text).
    depth: u8,
    direction: Direction,
    /// The most severe action of what the scan does not see: decoded segments and leaks.
    side_action: Action,
    /// Segments scratch space.
    segments: Vec<Segment>,
    /// The text not released yet, and its redactions.
    pending: Pending,
    /// Leaks of protected texts and canaries, when asked for and the rulesets have rule LEAK.
    leak: Option<Box<LeakTracker>>,
    /// Key of hashed placeholders, when the caller gives one (else the engine's).
    placeholder_key: Option<Box<[u8; 32]>>,
}

/// The text of a stream from its release offset on, the regions still open in it, and (when
/// the caller wants the released text) the sanitized spans not yet released past.
#[derive(Default)]
struct Pending {
    /// The stream's text from offset `from` to what was fed.
    buf: String,
    from: u64,
    /// Compose [`StepResult::released_text`].
    text: bool,
    /// Regions and spans, from the first one on (most streams never have any).
    marks: Option<Box<Marks>>,
}

#[derive(Default)]
struct Marks {
    /// Region matches still open, with the offset from which their closing regex is still to be
    /// searched.
    regions: Vec<(Match, u64)>,
    /// Spans to sanitize (start, end, trigger) that start at or after `from`.
    spans: Vec<(u64, u64, u32)>,
    /// The end of the last placeholder released (its span may reach past `from`).
    skip_to: Option<u64>,
}

/// What a stream keeps of the hits it reported.
#[derive(Default)]
struct Reported {
    /// Every hit reported, for [`StreamSession::verdict`], up to [`MAX_KEPT_HITS`] (not kept
    /// after [`StreamSession::discard_verdict_hits`]).
    hits: Vec<Match>,
    /// Each distinct trigger reported (what the message is made of), by index.
    distinct: Vec<u32>,
    /// The message of the last step (the engine's shared copy when the bool is true), and what
    /// it was made from.
    message: Option<(Arc<str>, bool)>,
    message_key: Option<(Action, Option<&'static str>, usize)>,
    /// The hits found in decoded segments, with the span of the encoded run and the codec, up to
    /// [`MAX_KEPT_HITS`] (not kept after [`StreamSession::discard_verdict_hits`]).
    decoded: Vec<(Match, Codec)>,
    /// Score per rule fired in decoded segments.
    decoded_scores: Vec<(usize, f32)>,
}

impl StreamSession {
    pub fn new(engine: Arc<Engine>, opts: &ClassifyOptions) -> StreamSession {
        StreamSession::at_depth(engine, opts, 0)
    }

    fn at_depth(engine: Arc<Engine>, opts: &ClassifyOptions, depth: u8) -> StreamSession {
        let scan = ScanSession::new(
            &engine.scanner,
            engine.learned.as_ref(),
            opts.lang_hint.as_deref(),
            opts.direction,
        );
        let leak = match &opts.leak {
            Some(l) if engine.finds_leaks() && depth == 0 => {
                let canaries = l.canaries && engine.leak_triggers[1].is_some();
                let protected = if engine.leak_triggers[0].is_some() {
                    l.protected.clone()
                } else {
                    Vec::new()
                };
                (canaries || !protected.is_empty())
                    .then(|| Box::new(LeakTracker::new(l.key.clone(), protected, canaries)))
            }
            _ => None,
        };
        let placeholder_key = opts.placeholder_key.as_ref().map(|k| Box::new(*k.bytes()));
        StreamSession {
            engine,
            scan,
            reported: None,
            keep_hits: true,
            decode: (depth < MAX_DECODE_DEPTH).then(Box::default),
            depth,
            direction: opts.direction,
            side_action: Action::Allow,
            segments: Vec::new(),
            pending: Pending::default(),
            leak,
            placeholder_key,
        }
    }

    /// Stops keeping every reported hit for [`StreamSession::verdict`], whose `hits` (and
    /// sanitized text) then hold only what was reported before. For a caller that consumes each
    /// step's hits as they come (the daemon's streams): the stream's state then stays bounded by
    /// its automata and scores, not by how many hits it has reported.
    pub fn discard_verdict_hits(&mut self) {
        self.keep_hits = false;
        if let Some(r) = &mut self.reported {
            r.hits = Vec::new();
            r.decoded = Vec::new();
        }
    }

    /// Makes every step carry [`StepResult::released_text`]: the text it releases, with the
    /// sanitized spans replaced (call before the first chunk).
    pub fn compose_released_text(&mut self) {
        self.pending.text = true;
    }

    /// Bytes fed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.scan.bytes_seen()
    }

    pub fn is_finished(&self) -> bool {
        self.scan.is_finished()
    }

    /// The verdict so far.
    pub fn action(&self) -> Action {
        self.scan.action().max(self.side_action)
    }

    /// Bytes of state this stream holds (the struct, its tails and its vectors), for the budget
    /// figure in the benchmarks: the sum of [`state_parts`](Self::state_parts).
    pub fn state_bytes(&self) -> usize {
        self.state_parts().iter().map(|p| p.1).sum()
    }

    /// What [`state_bytes`](Self::state_bytes) counts, part by part (heap parts by capacity).
    pub fn state_parts(&self) -> Vec<(&'static str, usize)> {
        use std::mem::size_of;
        let mut parts = self.scan.state_parts();
        // The scan is part of this struct.
        parts[0].1 = size_of::<Self>();
        parts.push((
            "verdict hits",
            self.reported
                .as_ref()
                .map_or(0, |r| r.hits.capacity() * size_of::<Match>()),
        ));
        parts.push((
            "decoding",
            self.decode.as_ref().map_or(0, |d| d.state_bytes())
                + self.segments.capacity() * size_of::<Segment>()
                + self.reported.as_ref().map_or(0, |r| {
                    r.decoded.capacity() * size_of::<(Match, Codec)>()
                        + r.decoded_scores.capacity() * size_of::<(usize, f32)>()
                }),
        ));
        parts.push((
            "message",
            self.reported.as_ref().map_or(0, |r| {
                size_of::<Reported>()
                    + r.distinct.capacity() * 4
                    + r.message
                        .as_ref()
                        .map_or(0, |(m, shared)| if *shared { 0 } else { m.len() })
            }),
        ));
        parts.push((
            "unreleased text",
            self.pending.buf.capacity()
                + self.pending.marks.as_ref().map_or(0, |m| {
                    size_of::<Marks>()
                        + m.regions.capacity() * size_of::<(Match, u64)>()
                        + m.spans.capacity() * size_of::<(u64, u64, u32)>()
                }),
        ));
        parts.push((
            "leaks",
            self.leak
                .as_ref()
                .map_or(0, |l| size_of::<LeakTracker>() + l.state_bytes()),
        ));
        parts
    }

    /// Scans one chunk.
    ///
    /// # Panics
    /// If the stream grows past 4 GiB (offsets are kept in 32 bits; the daemon caps streams far
    /// lower).
    pub fn feed(&mut self, chunk: &str) -> StepResult {
        self.feed_inner(chunk, false)
    }

    /// Scans the last chunk of the input (call [`finish`](Self::finish) after it). The answer is
    /// the same as [`feed`](Self::feed)'s; knowing no more text follows lets an input shorter than
    /// the language probe have its language decided before the scan (the probe is then the whole
    /// input either way), so the walker groups of languages that cannot apply are not walked.
    /// Short prompts are most of what a daemon sees.
    pub fn feed_last(&mut self, chunk: &str) -> StepResult {
        self.feed_inner(chunk, true)
    }

    fn feed_inner(&mut self, chunk: &str, last: bool) -> StepResult {
        let e = &*self.engine;
        let step = self
            .scan
            .feed(&e.scanner, &e.rules, e.learned.as_ref(), chunk, last);
        if let Some(d) = &mut self.decode {
            d.feed(chunk, &mut self.segments);
        }
        self.pending.buf.push_str(chunk);
        let mut leaks = Vec::new();
        if let Some(l) = &mut self.leak {
            l.feed(chunk, &mut leaks);
        }
        self.report(step, leaks)
    }

    /// Applies the end of input: pending look-ahead, anchors and the DFAs' end-of-input
    /// transitions. Returns the final step.
    pub fn finish(&mut self) -> StepResult {
        let e = &*self.engine;
        let step = self.scan.finish(&e.scanner, &e.rules, e.learned.as_ref());
        if let Some(d) = &mut self.decode {
            d.finish(&mut self.segments);
        }
        let mut leaks = Vec::new();
        if let Some(l) = &mut self.leak {
            l.finish(&mut leaks);
        }
        self.report(step, leaks)
    }

    /// Scans each decoded segment found by this step as a text of its own (one level deeper),
    /// and returns its hits with the span of the encoded run in this text.
    fn scan_segments(&mut self) -> Vec<(Match, Codec)> {
        let mut found = Vec::new();
        let opts = ClassifyOptions {
            direction: self.direction,
            placeholder_key: Some(crate::leak::LeakKey::new(self.key())),
            ..ClassifyOptions::default()
        };
        for seg in std::mem::take(&mut self.segments) {
            let mut inner = StreamSession::at_depth(self.engine.clone(), &opts, self.depth + 1);
            inner.feed_last(&seg.text);
            inner.finish();
            let action = inner.action();
            if action == Action::Allow {
                continue;
            }
            self.side_action = self.side_action.max(action);
            let Some(rep) = inner.reported else { continue };
            let scores = inner.scan.fired_rules().collect::<Vec<_>>();
            let own = self.reported.get_or_insert_with(Box::default);
            for (rule, score) in scores {
                match own.decoded_scores.iter_mut().find(|s| s.0 == rule) {
                    Some(s) => s.1 = s.1.max(score),
                    None => own.decoded_scores.push((rule, score)),
                }
            }
            // Hits of the inner text (itself possibly decoded once more), at the run's span.
            let inner_hits = rep.hits.iter().map(|m| (*m, seg.codec));
            let nested = rep.decoded.iter().map(|(m, _)| (*m, seg.codec));
            for (mut m, codec) in inner_hits.chain(nested) {
                m.start = seg.start;
                m.end = seg.end;
                found.push((m, codec));
            }
        }
        found
    }

    /// Takes the matches of region triggers out of `found` (they wait for their end), and puts
    /// back the regions that closed: each runs from its match's start to the end of the first
    /// match of its closing regex after it, else to `until_max` bytes from its start (or the
    /// end of the text, when it comes first).
    fn close_regions(&mut self, found: &mut Vec<Match>) {
        let e = &*self.engine;
        let p = &mut self.pending;
        found.retain(|m| {
            if e.rules.triggers[m.trigger as usize].region.is_some() {
                let marks = p.marks.get_or_insert_with(Box::default);
                marks.regions.push((*m, m.end));
                false
            } else {
                true
            }
        });
        let Some(marks) = p.marks.as_mut().filter(|m| !m.regions.is_empty()) else {
            return;
        };
        let end = p.from + p.buf.len() as u64;
        let finished = self.scan.is_finished();
        let (buf, from) = (&p.buf, p.from);
        marks.regions.retain_mut(|(m, searched)| {
            let t = &e.rules.triggers[m.trigger as usize];
            let (Some(r), Some(re)) = (&t.region, &e.regions[m.trigger as usize]) else {
                return false;
            };
            let limit = m.start + u64::from(r.max);
            let hi = end.min(limit);
            let lo = (*searched).max(m.end).min(hi);
            let bytes = buf.as_bytes();
            let input =
                regex_automata::Input::new(bytes).range((lo - from) as usize..(hi - from) as usize);
            let close = match re.find(input) {
                // A match that reaches the end of what was fed may grow with the next chunk.
                Some(c) if finished || hi == limit || (c.end() as u64 + from) < end => {
                    Some(c.end() as u64 + from)
                }
                Some(_) => None,
                None if finished || end >= limit => Some(hi),
                None => None,
            };
            match close {
                Some(close) => {
                    found.push(Match {
                        trigger: m.trigger,
                        start: m.start,
                        end: close.max(m.end),
                    });
                    false
                }
                None => {
                    *searched = end.saturating_sub(u64::from(r.until_len));
                    true
                }
            }
        });
    }

    /// Turns a scan step into the caller's answer: the hits in order of span, what is kept for
    /// the verdict, the message, and the text released.
    fn report(&mut self, step: ScanStep, leaks: Vec<crate::leak::LeakHit>) -> StepResult {
        let ScanStep {
            action,
            mut found,
            mut release_offset,
        } = step;
        self.close_regions(&mut found);
        for l in &leaks {
            let kind = match l.kind {
                crate::leak::LeakKind::Shingles => 0,
                crate::leak::LeakKind::Canary => 1,
            };
            if let Some(t) = self.engine.leak_triggers[kind] {
                let a = self.engine.rules.triggers[t as usize].actions[self.direction.index()];
                self.side_action = self.side_action.max(a);
                found.push(Match {
                    trigger: t,
                    start: l.start,
                    end: l.end,
                });
            }
        }
        let decoded = if self.segments.is_empty() {
            Vec::new()
        } else {
            self.scan_segments()
        };
        let action = action.max(self.side_action);
        if let Some(hold) = self.decode.as_ref().and_then(|d| d.hold_offset()) {
            release_offset = release_offset.min(hold);
        }
        if let Some(hold) = self.leak.as_ref().and_then(|l| l.hold_offset()) {
            release_offset = release_offset.min(hold);
        }
        for (m, _) in self.pending.marks.iter().flat_map(|m| m.regions.iter()) {
            release_offset = release_offset.min(m.start);
        }
        let dir = self.direction.index();
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
            hits = found.iter().map(|f| hit_of(&self.engine, f, dir)).collect();
        }
        if !decoded.is_empty() {
            let rep = self.reported.get_or_insert_with(Box::default);
            for (m, codec) in &decoded {
                if !rep.distinct.contains(&m.trigger) {
                    rep.distinct.push(m.trigger);
                }
                if self.keep_hits && rep.decoded.len() < MAX_KEPT_HITS {
                    rep.decoded.push((*m, *codec));
                }
                hits.push(decoded_hit_of(&self.engine, m, *codec, dir));
            }
            sort_hits(&mut hits);
        }
        if self.pending.text {
            let triggers = &self.engine.rules.triggers;
            let sanitized = found
                .iter()
                .chain(decoded.iter().map(|d| &d.0))
                .filter(|m| triggers[m.trigger as usize].actions[dir] == Action::Sanitize);
            for m in sanitized {
                let marks = self.pending.marks.get_or_insert_with(Box::default);
                marks.spans.push((m.start, m.end, m.trigger));
            }
        }
        let released_text = self.release(&mut release_offset);
        let language = self.scan.language();
        // The message depends only on the action, the language and the distinct triggers: rebuild
        // it when one of them changes, not on every chunk.
        // (No hit reported yet: the action is ALLOW, which has none.)
        let message = match &mut self.reported {
            Some(rep) => {
                let language = message_language(&self.engine, &self.scan, &rep.distinct);
                let key = (action, language, rep.distinct.len());
                if rep.message_key != Some(key) {
                    rep.message = self.engine.message(action, &rep.distinct, language);
                    rep.message_key = Some(key);
                }
                rep.message.as_ref().map(|(m, _)| m.to_string())
            }
            None => None,
        };
        StepResult {
            action,
            hits,
            release_offset,
            language,
            message,
            released_text,
        }
    }

    /// Releases the text up to `release` (moved back to a character boundary): composes it with
    /// the sanitized spans replaced when asked to, and forgets it.
    fn release(&mut self, release: &mut u64) -> Option<String> {
        let key = self.key();
        let p = &mut self.pending;
        // Never before what an earlier step released (offsets never decrease).
        let mut cut = release.saturating_sub(p.from).min(p.buf.len() as u64) as usize;
        while !p.buf.is_char_boundary(cut) {
            cut -= 1;
        }
        *release = p.from + cut as u64;
        let out = p.text.then(|| {
            let mut out = String::new();
            let triggers = &self.engine.rules.triggers;
            let dir = self.direction.index();
            let (buf, from) = (&p.buf, p.from);
            let mut at = from;
            if let Some(marks) = &mut p.marks {
                marks.spans.sort_unstable();
                at = at.max(marks.skip_to.unwrap_or(0));
                let mut used = 0;
                for &(s, e, t) in marks.spans.iter() {
                    if s >= *release {
                        break;
                    }
                    used += 1;
                    let (lo, hi) = crate::decide::widen(
                        buf,
                        s.saturating_sub(from) as usize,
                        e.saturating_sub(from) as usize,
                    );
                    let (s, e) = (from + lo as u64, from + hi as u64);
                    match marks.skip_to {
                        // Overlapping or touching the last placeholder: one placeholder for both.
                        Some(k) if s <= k => {
                            marks.skip_to = Some(k.max(e));
                            at = at.max(k.max(e));
                            continue;
                        }
                        _ => {}
                    }
                    if s > at {
                        out.push_str(&buf[(at - from) as usize..lo]);
                    }
                    crate::decide::render(
                        &triggers[t as usize].placeholders[dir],
                        &buf[lo..hi],
                        &key,
                        &mut out,
                    );
                    marks.skip_to = Some(e);
                    at = e;
                }
                marks.spans.drain(..used);
            }
            if at < *release {
                out.push_str(&buf[(at - from) as usize..cut]);
            }
            out
        });
        // Forget the released text (a placeholder's value was rendered when it went out; only
        // its end still matters).
        p.buf.drain(..cut);
        p.from += cut as u64;
        // Room grown while a region or a long hold kept text is given back.
        if p.buf.capacity() >= 4096 && p.buf.len() < p.buf.capacity() / 4 {
            p.buf.shrink_to(p.buf.len() * 2);
        }
        out
    }

    /// The key of hashed placeholders: the caller's, else the engine's.
    fn key(&self) -> [u8; 32] {
        self.placeholder_key
            .as_deref()
            .copied()
            .unwrap_or(self.engine.placeholder_key)
    }

    /// The verdict for everything seen so far (call after [`finish`](Self::finish) for the final
    /// one). With the original `text`, a SANITIZE verdict carries the sanitized text.
    pub fn verdict(&self, text: Option<&str>) -> Verdict {
        let dir = self.direction.index();
        let (kept, distinct, decoded) = match &self.reported {
            Some(r) => (&r.hits[..], &r.distinct[..], &r.decoded[..]),
            None => (&[][..], &[][..], &[][..]),
        };
        let mut hits: Vec<Hit> = kept.iter().map(|f| hit_of(&self.engine, f, dir)).collect();
        hits.extend(
            decoded
                .iter()
                .map(|(m, codec)| decoded_hit_of(&self.engine, m, *codec, dir)),
        );
        sort_hits(&mut hits);
        hits.dedup();
        let action = self.action();
        let language = self.scan.language();
        let languages_applied = self.scan.lang_set().map(|s| s.codes()).unwrap_or_default();
        let message = crate::decide::message(
            &self.engine.rules,
            action,
            distinct,
            message_language(&self.engine, &self.scan, distinct),
        );
        let sanitized_text = match text {
            Some(t) if action == Action::Sanitize => {
                let triggers = &self.engine.rules.triggers;
                let spans = kept
                    .iter()
                    .chain(decoded.iter().map(|d| &d.0))
                    .filter(|m| triggers[m.trigger as usize].actions[dir] == Action::Sanitize)
                    .map(|m| {
                        (
                            m.start,
                            m.end,
                            &triggers[m.trigger as usize].placeholders[dir],
                        )
                    })
                    .collect();
                Some(crate::decide::sanitize_spans(t, spans, &self.key()))
            }
            _ => None,
        };
        let mut scores: Vec<(usize, f32)> = self.scan.fired_rules().collect();
        for &(rule, score) in self.reported.iter().flat_map(|r| r.decoded_scores.iter()) {
            match scores.iter_mut().find(|s| s.0 == rule) {
                Some(s) => s.1 = s.1.max(score),
                None => scores.push((rule, score)),
            }
        }
        let rule_scores = scores
            .into_iter()
            .map(|(i, score)| (self.engine.rules.rules[i].id.clone(), score))
            .collect();
        Verdict {
            action,
            hits,
            language,
            languages_applied,
            sanitized_text,
            message,
            rule_scores,
        }
    }
}

/// The language a verdict's message is written in. The text's language when decided; while it
/// is undecided (a short prompt: whatlang guesses wildly below a sentence or two), the language
/// of the language triggers that hit, when they all are of one language (they are words of the
/// text); else the most likely language of the text's script (English for Latin text). So help
/// resources never go out in a language the text is not in.
fn message_language(engine: &Engine, scan: &ScanSession, triggers: &[u32]) -> Option<&'static str> {
    let set = scan.lang_set()?;
    if let Some(l) = set.primary {
        return Some(crate::lang::code(l));
    }
    let mut of_hits = None;
    for &t in triggers {
        let l = engine.rules.triggers[t as usize].lang;
        if l == crate::lang::NEUTRAL {
            continue;
        }
        match of_hits {
            None => of_hits = Some(l),
            Some(seen) if seen == l => {}
            Some(_) => {
                of_hits = None;
                break;
            }
        }
    }
    of_hits.or(set.fallback()).map(crate::lang::code)
}

/// Hits in the order they are reported: by span, then trigger id.
fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(|a, b| (a.start, a.end, &a.trigger_id).cmp(&(b.start, b.end, &b.trigger_id)));
}

/// The hit a trigger's match in a decoded segment reports: trigger id
/// `<trigger>+decoded.<codec>`, the span of the encoded run.
fn decoded_hit_of(engine: &Engine, m: &Match, codec: Codec, dir: usize) -> Hit {
    let mut h = hit_of(engine, m, dir);
    h.trigger_id = format!("{}+decoded.{}", h.trigger_id, codec.name()).into();
    h
}

/// The hit a trigger's match reports (`dir`: the direction's index).
fn hit_of(engine: &Engine, f: &Match, dir: usize) -> Hit {
    let t = &engine.rules.triggers[f.trigger as usize];
    let rule = &engine.rules.rules[t.rule];
    Hit {
        rule_id: rule.id.clone(),
        trigger_id: t.id.clone(),
        language: crate::lang::code(t.lang),
        start: f.start,
        end: f.end,
        score: t.weight,
        action: t.actions[dir],
    }
}
