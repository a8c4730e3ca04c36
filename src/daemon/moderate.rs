//! Remote moderation in the request path: which calls are sent, the deadline, the fail modes,
//! merging remote hits into the local verdict, novel-attack counting, and a stream's windows.
//!
//! The client (keys, retries, breaker, limits, cache, batching, budgets) is
//! [`crate::io::moderation`], behind the small trait [`Remote`]; categories become hits in
//! [`crate::moderation`].
//!
//! Invariants:
//! - A verdict never waits for the remote answer longer than `moderation.deadline`. Past it, or
//!   on any failure, the verdict is the local one plus a hit for every mapped rule that fails
//!   closed in that direction; rules that fail open are counted
//!   (`mistguard_moderation_fail_open_total`) and the answer carries the reason
//!   `moderation_unavailable`.
//! - Remote hits only add: the action is the most severe of local and remote hits.
//! - No text and no key is logged; a failure is logged by its kind.

use super::config::{ModerationConfig, ModerationPolicy};
use crate::action::Action;
use crate::engine::{Direction, Engine, Hit};
use crate::io::moderation::{Answer, Failure};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Asks the remote model about one text. `subject` is the caller's keyed subject hash (for the
/// per-subject budget).
#[tonic::async_trait]
pub trait Remote: Send + Sync + 'static {
    async fn moderate(&self, text: &str, subject: Option<&str>) -> Result<Answer, Failure>;
}

#[tonic::async_trait]
impl Remote for crate::io::moderation::Moderator {
    async fn moderate(&self, text: &str, subject: Option<&str>) -> Result<Answer, Failure> {
        crate::io::moderation::Moderator::moderate(self, text, subject).await
    }
}

/// Remote moderation as the service uses it.
pub struct Moderation {
    remote: Arc<dyn Remote>,
    pub cfg: ModerationConfig,
    /// Novel-attack detections within the level-3 window (this replica's).
    novel: std::sync::Mutex<NovelWindow>,
    level3_novel: u32,
    level3_window: std::time::Duration,
    /// Where the `novel_attack` alerts are kept for the review console.
    alerts: super::escalation::Alerts,
}

#[derive(Default)]
struct NovelWindow {
    times: VecDeque<u64>,
    alerted_at: Option<u64>,
}

/// What remote moderation added to one text (or stream window).
#[derive(Debug, Default)]
pub struct Checked {
    /// Remote hits, or the fail-closed rules' hits when no answer came.
    pub hits: Vec<Hit>,
    /// `Some(kind)` when no answer came in time (`deadline`, or a failure kind).
    pub unavailable: Option<&'static str>,
    /// Rules that failed open on this call (none when an answer came).
    pub failed_open: bool,
    /// The model that answered.
    pub model: Option<Arc<str>>,
    /// The categories that reached their thresholds.
    pub categories: Vec<String>,
}

impl Checked {
    /// The response's reason when the answer was late or failed.
    pub fn reason(&self) -> &'static str {
        if self.unavailable.is_some() {
            "moderation_unavailable"
        } else {
            ""
        }
    }
}

/// The direction's label: prompts (input, unspecified, tool arguments) or completions.
fn side(dir: Direction) -> &'static str {
    if dir == Direction::Output {
        "output"
    } else {
        "input"
    }
}

impl Moderation {
    pub fn new(
        remote: Arc<dyn Remote>,
        cfg: ModerationConfig,
        escalation: &super::config::EscalationConfig,
    ) -> Moderation {
        Moderation {
            remote,
            cfg,
            novel: std::sync::Mutex::new(NovelWindow::default()),
            level3_novel: escalation.level3_novel,
            level3_window: escalation.level3_window,
            alerts: super::escalation::Alerts::default(),
        }
    }

    /// Keeps this daemon's level-3 alerts in `alerts` (the review console's list).
    pub fn with_alerts(mut self, alerts: super::escalation::Alerts) -> Moderation {
        self.alerts = alerts;
        self
    }

    /// Counts a remote hit on text the local rules passed (a novel attack vector) per category,
    /// and raises the level-3 alert (cause `novel_attack`) once `escalation.level3_novel` of them
    /// fall within `escalation.level3_window`, at most once per window. Returns whether it did.
    pub fn novel(&self, categories: &[String], now_ms: u64) -> bool {
        if categories.is_empty() {
            return false;
        }
        for c in categories {
            metrics::counter!("mistguard_moderation_novel_total", "category" => category_label(c))
                .increment(1);
        }
        let window = self.level3_window.as_millis() as u64;
        let mut w = self.novel.lock().unwrap_or_else(|e| e.into_inner());
        while w
            .times
            .front()
            .is_some_and(|t| now_ms.saturating_sub(*t) > window)
        {
            w.times.pop_front();
        }
        w.times.push_back(now_ms);
        while w.times.len() > self.level3_novel as usize {
            w.times.pop_front();
        }
        let recently = w
            .alerted_at
            .is_some_and(|t| now_ms.saturating_sub(t) <= window);
        if w.times.len() >= self.level3_novel as usize && !recently {
            w.alerted_at = Some(now_ms);
            self.alerts
                .raise("novel_attack", w.times.len(), self.level3_window);
            return true;
        }
        false
    }

    pub fn policy(&self, dir: Direction) -> ModerationPolicy {
        if dir == Direction::Output {
            self.cfg.output
        } else {
            self.cfg.input
        }
    }

    /// Whether a call of this direction, local verdict and ask is sent.
    pub fn wants(&self, dir: Direction, local: Action, asked: bool) -> bool {
        self.policy(dir).wants(local, asked)
    }

    fn fail_closed(&self, dir: Direction) -> &[String] {
        if dir == Direction::Output {
            &self.cfg.fail_closed_output
        } else {
            &self.cfg.fail_closed_input
        }
    }

    /// Asks about `text` (the span `start..end` of the caller's text or stream), waiting at most
    /// `moderation.deadline`; `local_passed` says the local verdict had no hit (a remote hit is
    /// then a novel attack).
    pub async fn check(
        &self,
        engine: &Engine,
        text: &str,
        dir: Direction,
        subject: Option<&str>,
        span: (u64, u64),
    ) -> Checked {
        let answer =
            tokio::time::timeout(self.cfg.deadline, self.remote.moderate(text, subject)).await;
        let rs = engine.ruleset();
        let side = side(dir);
        match answer {
            Ok(Ok(a)) => {
                let remote = self.cfg.mapping.hits(&a.result);
                metrics::counter!(
                    "mistguard_moderation_checks_total",
                    "direction" => side,
                    "outcome" => if a.cached { "cached" } else { "answered" }
                )
                .increment(1);
                for h in &remote {
                    metrics::counter!("mistguard_moderation_hits_total", "category" => category_label(&h.category))
                        .increment(1);
                }
                Checked {
                    hits: crate::moderation::to_hits(&remote, rs, span.0, span.1),
                    unavailable: None,
                    failed_open: false,
                    model: Some(a.model),
                    categories: remote.into_iter().map(|h| h.category).collect(),
                }
            }
            Ok(Err(f)) => self.unavailable(rs, dir, span, f.kind.as_str()),
            Err(_) => self.unavailable(rs, dir, span, "deadline"),
        }
    }

    /// What a call gets when no answer came (`kind` says why): the fail-closed rules' hits,
    /// counted; fail-open rules counted.
    pub fn unavailable(
        &self,
        rs: &crate::rules::CompiledRuleset,
        dir: Direction,
        span: (u64, u64),
        kind: &'static str,
    ) -> Checked {
        let side = side(dir);
        metrics::counter!("mistguard_moderation_checks_total", "direction" => side, "outcome" => "unavailable")
            .increment(1);
        let closed = self.fail_closed(dir);
        let hits =
            crate::moderation::unavailable_hits(closed, &self.cfg.mapping, rs, span.0, span.1);
        let mapped: std::collections::BTreeSet<&str> = self
            .cfg
            .mapping
            .rules()
            .iter()
            .map(|l| l.rule_id())
            .collect();
        let failed_open = mapped.iter().any(|r| !closed.iter().any(|c| c == r));
        if failed_open {
            metrics::counter!("mistguard_moderation_fail_open_total", "direction" => side)
                .increment(1);
        }
        if !hits.is_empty() {
            metrics::counter!("mistguard_moderation_fail_closed_total", "direction" => side)
                .increment(1);
        }
        tracing::debug!(
            target: "mistguard::moderation",
            direction = side,
            kind,
            fail_closed_rules = hits.len(),
            "remote moderation unavailable: local verdict plus fail modes"
        );
        Checked {
            hits,
            unavailable: Some(kind),
            failed_open,
            model: None,
            categories: Vec::new(),
        }
    }
}

/// Category names are open (a new model may add any): a label keeps the known ones and folds the
/// rest into `other`, so the metric stays bounded.
pub fn category_label(c: &str) -> &'static str {
    const KNOWN: [&str; 12] = [
        "sexual",
        "hate_and_discrimination",
        "violence_and_threats",
        "dangerous_and_criminal_content",
        "dangerous",
        "criminal",
        "selfharm",
        "health",
        "financial",
        "law",
        "pii",
        "jailbreaking",
    ];
    KNOWN.into_iter().find(|k| *k == c).unwrap_or("other")
}

/// The message of a verdict of `action` that remote hits raised.
pub fn message_of(
    engine: &Engine,
    hits: &[Hit],
    action: Action,
    language: Option<&str>,
) -> Option<String> {
    crate::moderation::rule_message(engine.ruleset(), hits, action, language)
}

/// Merges remote hits into a local verdict's action, hits and message; returns the new action.
/// A SANITIZE's text stays only while the action is still SANITIZE.
pub fn merge(engine: &Engine, verdict: &mut crate::verdict::Verdict, checked: &Checked) -> Action {
    if checked.hits.is_empty() {
        return verdict.action;
    }
    let before = verdict.action;
    let remote_action = checked
        .hits
        .iter()
        .map(|h| h.action)
        .max()
        .unwrap_or(Action::Allow);
    verdict.hits.extend(checked.hits.iter().cloned());
    verdict.action = before.max(remote_action);
    if verdict.action > before {
        let remote_msg = message_of(engine, &checked.hits, verdict.action, verdict.language);
        verdict.message = match (remote_msg, verdict.message.take()) {
            (Some(r), Some(l)) if r != l => Some(format!("{r} {l}")),
            (Some(r), _) => Some(r),
            (None, l) => l,
        };
    }
    if verdict.action != Action::Sanitize {
        verdict.sanitized_text = None;
    }
    verdict.action
}

/// A stream window's remote verdict.
#[derive(Debug)]
pub struct WindowVerdict {
    pub start: u64,
    pub end: u64,
    pub checked: Checked,
}

/// A stream's remote moderation: its windows, the verdicts in flight and, in strict mode, the
/// released text held until its windows are moderated.
pub struct StreamModeration {
    m: Arc<Moderation>,
    engine: Arc<Engine>,
    dir: Direction,
    subject: Option<String>,
    asked: bool,
    window: usize,
    strict: bool,
    /// The open window's text and its offset in the stream.
    buf: String,
    buf_start: u64,
    tx: mpsc::UnboundedSender<WindowVerdict>,
    pub rx: mpsc::UnboundedReceiver<WindowVerdict>,
    in_flight: usize,
    /// Windows sent whose verdict has not arrived: start -> end.
    pending: BTreeMap<u64, u64>,
    /// Windows whose verdict is in, not yet contiguous with `moderated`.
    done: BTreeMap<u64, u64>,
    /// Every byte before this has its remote verdict (or needed none).
    moderated: u64,
    /// Strict mode: released pieces `(end offset, text)` not yet sent.
    held: VecDeque<(u64, String)>,
    /// What the client was told it may forward.
    released: u64,
}

/// Windows of one stream waiting for their remote verdict at most; past it a window is not sent
/// and its fail mode applies (`stream_backlog`), so one stream of huge chunks cannot flood the
/// client's queue.
const MAX_IN_FLIGHT: usize = 64;

/// Where a window may end: after a sentence end (`.`, `!`, `?`, a newline, CJK full stops) once
/// it holds `min` bytes; else at `max` bytes (on a character boundary).
///
/// Reads at most `max` bytes of `text`, whatever its length.
fn window_end(text: &str, min: usize, max: usize) -> Option<usize> {
    if text.len() < min {
        return None;
    }
    let boundary = |mut i: usize| {
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let from = boundary(min);
    let to = boundary(text.len().min(max));
    if let Some((i, c)) = text[from..to]
        .char_indices()
        .find(|(_, c)| matches!(c, '.' | '!' | '?' | '\n' | '。' | '！' | '？'))
    {
        return Some(from + i + c.len_utf8());
    }
    (text.len() >= max).then_some(to)
}

impl StreamModeration {
    pub fn new(
        m: Arc<Moderation>,
        engine: Arc<Engine>,
        dir: Direction,
        subject: Option<String>,
        asked: bool,
    ) -> StreamModeration {
        let (tx, rx) = mpsc::unbounded_channel();
        StreamModeration {
            window: m.cfg.stream_window,
            strict: m.cfg.stream_strict,
            m,
            engine,
            dir,
            subject,
            asked,
            buf: String::new(),
            buf_start: 0,
            tx,
            rx,
            in_flight: 0,
            pending: BTreeMap::new(),
            done: BTreeMap::new(),
            moderated: 0,
            held: VecDeque::new(),
            released: 0,
        }
    }

    /// Adds a chunk; every window it closes is sent (when the policy wants it with the local
    /// verdict so far) in the background. Work is linear in the chunk: each window is searched
    /// within its own bytes, and the rest is moved once.
    pub fn push(&mut self, chunk: &str, local: Action) {
        self.buf.push_str(chunk);
        let mut at = 0;
        while let Some(end) = window_end(&self.buf[at..], self.window / 4, self.window) {
            let text = self.buf[at..at + end].to_string();
            at += end;
            self.send(text, local);
        }
        self.buf.drain(..at);
    }

    /// Closes the last window (the stream ended).
    pub fn finish(&mut self, local: Action) {
        if !self.buf.is_empty() {
            let text = std::mem::take(&mut self.buf);
            self.send(text, local);
        }
    }

    fn send(&mut self, text: String, local: Action) {
        let start = self.buf_start;
        let end = start + text.len() as u64;
        self.buf_start = end;
        if !self.m.wants(self.dir, local, self.asked) {
            self.mark(start, end);
            return;
        }
        if self.in_flight >= MAX_IN_FLIGHT {
            // A flood of windows (a huge chunk): this one is not sent; its fail mode applies.
            let checked = self.m.unavailable(
                self.engine.ruleset(),
                self.dir,
                (start, end),
                "stream_backlog",
            );
            self.in_flight += 1;
            let _ = self.tx.send(WindowVerdict {
                start,
                end,
                checked,
            });
            return;
        }
        self.pending.insert(start, end);
        self.in_flight += 1;
        let (m, engine, dir, subject, tx) = (
            self.m.clone(),
            self.engine.clone(),
            self.dir,
            self.subject.clone(),
            self.tx.clone(),
        );
        tokio::spawn(async move {
            let checked = m
                .check(&engine, &text, dir, subject.as_deref(), (start, end))
                .await;
            let _ = tx.send(WindowVerdict {
                start,
                end,
                checked,
            });
        });
    }

    fn mark(&mut self, start: u64, end: u64) {
        self.done.insert(start, end);
        while let Some(end) = self.done.remove(&self.moderated) {
            self.moderated = end;
        }
    }

    /// Takes a window's verdict into account (its bytes count as moderated).
    pub fn arrived(&mut self, v: &WindowVerdict) {
        if self.pending.remove(&v.start).is_some()
            || v.checked.unavailable == Some("stream_backlog")
        {
            self.in_flight -= 1;
            self.mark(v.start, v.end);
        }
    }

    /// Gives up on the windows still in flight (the end of the stream waited long enough): each
    /// gets its fail mode, as a late answer would. Their verdicts, if they come, are ignored.
    pub fn give_up(&mut self) -> Vec<WindowVerdict> {
        let pending = std::mem::take(&mut self.pending);
        let mut out = Vec::new();
        for (start, end) in pending {
            self.in_flight -= 1;
            self.mark(start, end);
            out.push(WindowVerdict {
                start,
                end,
                checked: self.m.unavailable(
                    self.engine.ruleset(),
                    self.dir,
                    (start, end),
                    "deadline",
                ),
            });
        }
        out
    }

    /// Windows sent whose verdict has not arrived.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// What the client may be told now, given the engine's release: in background mode the
    /// engine's; in strict mode only pieces whose every byte was moderated. Returns the release
    /// offset and the text newly released.
    pub fn release(&mut self, offset: u64, text: Option<String>) -> (u64, String) {
        if !self.strict {
            self.released = offset;
            return (offset, text.unwrap_or_default());
        }
        if offset > self.held.back().map_or(self.released, |h| h.0) {
            self.held.push_back((offset, text.unwrap_or_default()));
        }
        let mut out = String::new();
        while let Some((end, _)) = self.held.front() {
            if *end > self.moderated {
                break;
            }
            let (end, t) = self.held.pop_front().expect("front exists");
            self.released = end;
            out.push_str(&t);
        }
        (self.released, out)
    }

    pub fn released(&self) -> u64 {
        self.released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_end_at_sentences_past_the_minimum_or_at_the_size() {
        assert_eq!(window_end("Hi. There", 4, 16), None);
        assert_eq!(window_end("Hello there. And more", 4, 64), Some(12));
        assert_eq!(window_end("no sentence end here at all", 4, 10), Some(10));
        // A multi-byte character is never split.
        assert_eq!(window_end("aaaaaaaaaé", 2, 10), Some(9));
        assert_eq!(window_end("日本語です。続き", 3, 64), Some(18));
        // A sentence end past the size does not count: the window ends at the size.
        assert_eq!(window_end("abcdefghij. more", 2, 8), Some(8));
    }
}
