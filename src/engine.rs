//! The public face of the core: a compiled ruleset that classifies whole texts and streams.
//!
//! [`Engine`] owns the ruleset and its automata; a [`StreamSession`] is one text or stream: the
//! scan (`scan::ScanSession`) plus what the caller is told (hits with their rule and trigger ids,
//! the message of the verdict, the sanitized text), composed through `decide`.

use crate::action::Action;
use crate::decode::{Codec, DecodeTracker, Segment};
use crate::learned::{Learned, Model};
use crate::rules::{CompiledRuleset, LoadError};
use crate::scan::{ScanSession, ScanStep, Scanner};
use crate::score::Match;
use std::path::Path;
use std::sync::Arc;

pub use crate::verdict::{ClassifyOptions, Hit, StepResult, Verdict};

/// A compiled ruleset, shareable across threads (`Arc<Engine>`).
pub struct Engine {
    pub(crate) rules: CompiledRuleset,
    pub(crate) scanner: Scanner,
    /// The learned tier, when a model is attached and one of its heads is in use.
    pub(crate) learned: Option<Learned>,
    /// Messages already composed, by (language, distinct triggers in the order reported): a
    /// stream points to its message here instead of holding a copy (see [`Engine::message`]).
    messages: dashmap::DashMap<MessageKey, Arc<str>>,
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
        Ok(Engine {
            rules,
            scanner,
            learned,
            messages: dashmap::DashMap::new(),
        })
    }

    /// [`Engine::from_ruleset`] with the scanner's build choices (which change its speed, not
    /// its results).
    pub fn from_ruleset_with(
        rules: CompiledRuleset,
        config: &crate::scan::ScanConfig,
    ) -> Result<Engine, LoadError> {
        let scanner = Scanner::build_with(&rules, config)?;
        Ok(Engine {
            rules,
            scanner,
            learned: None,
            messages: dashmap::DashMap::new(),
        })
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
    /// The most severe action of the decoded segments scanned so far.
    decoded_action: Action,
    /// Segments scratch space.
    segments: Vec<Segment>,
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
        );
        StreamSession {
            engine,
            scan,
            reported: None,
            keep_hits: true,
            decode: (depth < MAX_DECODE_DEPTH).then(Box::default),
            depth,
            decoded_action: Action::Allow,
            segments: Vec::new(),
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

    /// Bytes fed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.scan.bytes_seen()
    }

    pub fn is_finished(&self) -> bool {
        self.scan.is_finished()
    }

    /// The verdict so far.
    pub fn action(&self) -> Action {
        self.scan.action().max(self.decoded_action)
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
        parts
    }

    /// Scans one chunk.
    ///
    /// # Panics
    /// If the stream grows past 4 GiB (offsets are kept in 32 bits; the daemon caps streams far
    /// lower).
    pub fn feed(&mut self, chunk: &str) -> StepResult {
        let e = &*self.engine;
        let step = self
            .scan
            .feed(&e.scanner, &e.rules, e.learned.as_ref(), chunk, false);
        if let Some(d) = &mut self.decode {
            d.feed(chunk, &mut self.segments);
        }
        self.report(step)
    }

    /// Scans the last chunk of the input (call [`finish`](Self::finish) after it). The answer is
    /// the same as [`feed`](Self::feed)'s; knowing no more text follows lets an input shorter than
    /// the language probe have its language decided before the scan (the probe is then the whole
    /// input either way), so the walker groups of languages that cannot apply are not walked.
    /// Short prompts are most of what a daemon sees.
    pub fn feed_last(&mut self, chunk: &str) -> StepResult {
        let e = &*self.engine;
        let step = self
            .scan
            .feed(&e.scanner, &e.rules, e.learned.as_ref(), chunk, true);
        if let Some(d) = &mut self.decode {
            d.feed(chunk, &mut self.segments);
        }
        self.report(step)
    }

    /// Applies the end of input: pending look-ahead, anchors and the DFAs' end-of-input
    /// transitions. Returns the final step.
    pub fn finish(&mut self) -> StepResult {
        let e = &*self.engine;
        let step = self.scan.finish(&e.scanner, &e.rules, e.learned.as_ref());
        if let Some(d) = &mut self.decode {
            d.finish(&mut self.segments);
        }
        self.report(step)
    }

    /// Scans each decoded segment found by this step as a text of its own (one level deeper),
    /// and returns its hits with the span of the encoded run in this text.
    fn scan_segments(&mut self) -> Vec<(Match, Codec)> {
        let mut found = Vec::new();
        for seg in std::mem::take(&mut self.segments) {
            let mut inner = StreamSession::at_depth(
                self.engine.clone(),
                &ClassifyOptions::default(),
                self.depth + 1,
            );
            inner.feed_last(&seg.text);
            inner.finish();
            let action = inner.action();
            if action == Action::Allow {
                continue;
            }
            self.decoded_action = self.decoded_action.max(action);
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

    /// Turns a scan step into the caller's answer: the hits in order of span, what is kept for
    /// the verdict, and the message.
    fn report(&mut self, step: ScanStep) -> StepResult {
        let ScanStep {
            action,
            mut found,
            mut release_offset,
        } = step;
        let decoded = if self.segments.is_empty() {
            Vec::new()
        } else {
            self.scan_segments()
        };
        let action = action.max(self.decoded_action);
        if let Some(hold) = self.decode.as_ref().and_then(|d| d.hold_offset()) {
            release_offset = release_offset.min(hold);
        }
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
        if !decoded.is_empty() {
            let rep = self.reported.get_or_insert_with(Box::default);
            for (m, codec) in &decoded {
                if !rep.distinct.contains(&m.trigger) {
                    rep.distinct.push(m.trigger);
                }
                if self.keep_hits && rep.decoded.len() < MAX_KEPT_HITS {
                    rep.decoded.push((*m, *codec));
                }
                hits.push(decoded_hit_of(&self.engine, m, *codec));
            }
            sort_hits(&mut hits);
        }
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
        }
    }

    /// The verdict for everything seen so far (call after [`finish`](Self::finish) for the final
    /// one). With the original `text`, a SANITIZE verdict carries the sanitized text.
    pub fn verdict(&self, text: Option<&str>) -> Verdict {
        let (kept, distinct, decoded) = match &self.reported {
            Some(r) => (&r.hits[..], &r.distinct[..], &r.decoded[..]),
            None => (&[][..], &[][..], &[][..]),
        };
        let mut hits: Vec<Hit> = kept.iter().map(|f| hit_of(&self.engine, f)).collect();
        hits.extend(
            decoded
                .iter()
                .map(|(m, codec)| decoded_hit_of(&self.engine, m, *codec)),
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
            Some(t) if action == Action::Sanitize => Some(crate::decide::sanitize(t, &hits)),
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
fn decoded_hit_of(engine: &Engine, m: &Match, codec: Codec) -> Hit {
    let mut h = hit_of(engine, m);
    h.trigger_id = format!("{}+decoded.{}", h.trigger_id, codec.name()).into();
    h
}

/// The hit a trigger's match reports.
fn hit_of(engine: &Engine, f: &Match) -> Hit {
    let t = &engine.rules.triggers[f.trigger as usize];
    let rule = &engine.rules.rules[t.rule];
    Hit {
        rule_id: rule.id.clone(),
        trigger_id: t.id.clone(),
        language: crate::lang::code(t.lang),
        start: f.start,
        end: f.end,
        score: t.weight,
        action: t.action,
    }
}
