//! The learned tier: a compact multi-label classifier beside the automata, scored on fixed
//! windows of the original text, so that a stream and the whole text see the same windows and
//! agree by construction.
//!
//! - **Features** (`features.rs`): hashed character 1–4-grams and word uni- and bigrams of the
//!   word view's normalized text (so evasion tricks fold as they do for the rules), each
//!   belonging to the 256-byte block of the original text that holds its last character.
//! - **Model** (`model.rs`): an int8 table of 2^kbits rows (one weight per head) and one
//!   calibrated logistic head per label, from a checksummed file (`models/`, rebuilt by
//!   `training/`).
//! - **Windows**: window k is blocks k and k+1 (512 bytes, stride 256); a text of one block is
//!   one window. A window is decided once no feature can still fall into its blocks. Its
//!   probability per head gives, at or above the head's *alone* threshold (`act`, or
//!   `act_model_only` for RULE-MIST-005 and 006), a hit `model.<rule>` reported at once with the
//!   rule's action (capped by policy.toml's `model_action`); at or above the *flag* threshold,
//!   evidence worth half the rule's threshold that adds up with the rule's triggers in the same
//!   score window (and, with `[model] flag_hits = true`, a FLAG hit below `act`). A hit's span
//!   is its window.
//!
//! The hits are ordinary `score::Match`es of triggers this module adds to the ruleset
//! ([`attach`]), so scoring, reporting and messages treat them like any other.

mod features;
pub mod model;

pub use model::{Model, ModelError, Thresholds, HEADS, LABELS};

use crate::action::Action;
use crate::lang::NEUTRAL;
use crate::rules::{Boundary, CompiledRuleset, ModelMode, TriggerInfo, TriggerKind, View};
use crate::score::Match;
use features::{FeatureSink, Features};
use std::sync::Arc;

/// The model file bundled into the binary (`models/mistguard-model.bin`).
pub const BUNDLED_MODEL: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/models/mistguard-model.bin"
));

/// The bundled model.
///
/// # Panics
/// If the bundled file does not load (a test holds it).
pub fn bundled() -> Model {
    Model::from_bytes(BUNDLED_MODEL, "<bundled>/models/mistguard-model.bin")
        .unwrap_or_else(|e| panic!("the bundled model: {e}"))
}

/// Bytes of original text per block; a window is two blocks.
pub const BLOCK_BYTES: u64 = 256;

/// One head in use: its label, thresholds and the triggers its hits are reported as.
#[derive(Clone, Debug)]
pub struct Head {
    /// Index into [`LABELS`].
    pub label: usize,
    /// At or above: a hit that fires the rule alone.
    pub alone: f32,
    /// At or above (and below `alone`): a FLAG hit, and evidence that adds up.
    pub flag: f32,
    alone_trigger: u32,
    add_up_trigger: u32,
    flag_trigger: u32,
}

/// The learned tier of an engine: the model and the heads its ruleset lets act.
pub struct Learned {
    pub model: Arc<Model>,
    /// The model's weights for the heads in use.
    pub table: Table,
    pub mode: ModelMode,
    /// policy.toml `[model] flag_hits`.
    pub flag_hits: bool,
    pub heads: Vec<Head>,
    /// By rule index: a head's hits add to the rule's score (the rule's score windows then wait
    /// for the model's undecided windows, so that streams and whole texts agree).
    adds_to: Vec<bool>,
}

/// Adds the learned tier's triggers to a ruleset: for each head the model enables and the
/// ruleset lets act (`model = false` in policy.toml turns a rule's head off), a trigger that
/// fires the rule alone and one that adds up (both with the rule's action, capped by
/// `model_action`), and a standalone FLAG trigger, reported at once outside the rule's score, so
/// that a flag-level window is a FLAG and never makes the rule fire by itself. Returns `None`
/// when no head is in use.
pub fn attach(rules: &mut CompiledRuleset, model: Arc<Model>) -> Option<Learned> {
    let mut heads = Vec::new();
    let mut adds_to = Vec::new();
    for (label, id) in LABELS.iter().enumerate() {
        if !model.enabled[label] {
            continue;
        }
        let Some(ri) = rules.rules.iter().position(|r| &*r.id == *id) else {
            continue;
        };
        let rule = rules.rules[ri].clone();
        if !rule.model {
            continue;
        }
        let action = rule
            .model_action
            .map_or(rule.action, |a| a.min(rule.action));
        let t = model.thresholds[label];
        let alone = if matches!(*id, "RULE-MIST-005" | "RULE-MIST-006") {
            t.act_model_only
        } else {
            t.act
        };
        let trigger = |weight: f32, action: Action, standalone: bool| TriggerInfo {
            id: format!("model.{id}").into(),
            rule: ri,
            lang: NEUTRAL,
            weight,
            view: View::Raw,
            boundary: Boundary::None,
            kind: TriggerKind::Model,
            validate: None,
            message: None,
            action,
            actions: [action, action],
            directions: [true, true],
            placeholders: std::array::from_fn(|_| crate::rules::Placeholder {
                mode: crate::rules::PlaceholderMode::Filtered,
                label: crate::rules::default_label(&rule.id, "").into(),
            }),
            region: None,
            standalone,
            // A FLAG says nothing of the rule's action; self-harm's help resources always go.
            rule_message: !standalone || *id == "RULE-MIST-004",
            file: model.source.as_str().into(),
            line: 0,
        };
        let base = rules.triggers.len() as u32;
        // Alone: reported at once with the rule's action. Adding up: half the rule's threshold
        // in its score. FLAG: reported at once.
        rules.triggers.push(trigger(rule.threshold, action, true));
        rules
            .triggers
            .push(trigger(rule.threshold / 2.0, action, false));
        rules.triggers.push(trigger(1.0, Action::Flag, true));
        adds_to.push(ri);
        heads.push(Head {
            label,
            alone,
            flag: t.flag.min(alone),
            alone_trigger: base,
            add_up_trigger: base + 1,
            flag_trigger: base + 2,
        });
    }
    if heads.is_empty() {
        return None;
    }
    let labels: Vec<usize> = heads.iter().map(|h| h.label).collect();
    Some(Learned {
        table: Table::of(&model, &labels),
        model,
        mode: rules.model_mode,
        flag_hits: rules.model_flag_hits,
        heads,
        adds_to: (0..rules.rules.len())
            .map(|r| adds_to.contains(&r))
            .collect(),
    })
}

/// The weight table a stream sums: the model's rows cut to the heads in use (4 bytes a row for up
/// to four heads instead of 8: half the memory the lookups touch; the table is the tier's cost).
pub struct Table {
    kbits: u32,
    /// Bytes per row: 4 or 8.
    stride: usize,
    /// The label of each lane of a row.
    lanes: Vec<usize>,
    weights: Box<[i8]>,
}

impl Table {
    /// Every head of the model.
    pub fn full(model: &Model) -> Table {
        Table::of(model, &(0..HEADS).collect::<Vec<_>>())
    }

    /// The heads of `labels` (at most [`HEADS`]).
    pub fn of(model: &Model, labels: &[usize]) -> Table {
        let stride = if labels.len() <= 4 { 4 } else { 8 };
        let rows = 1usize << model.kbits;
        let mut weights = vec![0i8; rows * stride].into_boxed_slice();
        for r in 0..rows {
            let row = model.row(r as u32);
            for (lane, &label) in labels.iter().enumerate() {
                weights[r * stride + lane] = row[label];
            }
        }
        Table {
            kbits: model.kbits,
            stride,
            lanes: labels.to_vec(),
            weights,
        }
    }

    /// Bytes of memory.
    pub fn memory_bytes(&self) -> usize {
        self.weights.len()
    }

    /// The sums of a window, by label (the labels without a lane stay 0).
    fn by_label(&self, acc: &[i32; HEADS]) -> [i32; HEADS] {
        let mut out = [0; HEADS];
        for (lane, &label) in self.lanes.iter().enumerate() {
            out[label] = acc[lane];
        }
        out
    }
}

/// A block's features so far: the sum of their weight rows (by lane) and their number.
#[derive(Clone, Copy, Debug)]
struct Block {
    index: u64,
    acc: [i32; HEADS],
    n: u32,
}

/// One stream's learned-tier state: the running feature hashes, the blocks that may still get
/// features, and the first window not decided yet. About 120 bytes, plus 40 per open block
/// (usually one or two).
#[derive(Clone, Debug, Default)]
pub struct LearnedState {
    features: Features,
    /// Blocks from the first undecided window on that have features, by index.
    blocks: Vec<Block>,
    next_window: u64,
    /// Original offsets at or past this are clamped to it (the end of input, once known: the
    /// closing space of the normalized text belongs to the last block).
    limit: u64,
}

/// Collects a batch's features as (bucket, block) pairs, to be summed in one tight loop
/// afterwards: the table lookups are independent, so the processor overlaps their cache misses
/// (summing each feature as it is hashed made the tier three times slower).
struct Collect<'a> {
    out: &'a mut Vec<(u32, u32)>,
    limit: u64,
}

impl FeatureSink for Collect<'_> {
    #[inline]
    fn add(&mut self, bucket: u32, at: u64) {
        self.out
            .push((bucket, (at.min(self.limit) / BLOCK_BYTES) as u32));
    }
}

thread_local! {
    /// The features of one batch (a batch is at most a few KiB of text: bounded).
    static FEATURES: std::cell::RefCell<Vec<(u32, u32)>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl LearnedState {
    pub fn new() -> LearnedState {
        LearnedState {
            limit: u64::MAX,
            ..Default::default()
        }
    }

    /// Bytes of state (heap by capacity).
    pub fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.blocks.capacity() * std::mem::size_of::<Block>()
    }

    /// Original offset of the first window not decided yet: every hit still to come starts at or
    /// after it.
    pub fn undecided_from(&self) -> u64 {
        self.next_window * BLOCK_BYTES
    }

    /// Adds a batch of normalized bytes, each with the original offset of the character it came
    /// from.
    pub fn consume(&mut self, table: &Table, bytes: &[u8], starts: &[u32]) {
        let mask = (1u64 << table.kbits) - 1;
        FEATURES.with(|f| {
            let mut f = f.borrow_mut();
            f.clear();
            let mut sink = Collect {
                out: &mut f,
                limit: self.limit,
            };
            let mut i = 0;
            while i < bytes.len() {
                let len = utf8_len(bytes[i]).min(bytes.len() - i);
                self.features
                    .push_char(mask, &bytes[i..i + len], starts[i] as u64, &mut sink);
                i += len;
            }
            match table.stride {
                4 => self.accumulate::<4>(table, &f),
                _ => self.accumulate::<8>(table, &f),
            }
        });
    }

    /// Sums the weight rows of `features` into their blocks; `N` is the table's stride.
    fn accumulate<const N: usize>(&mut self, table: &Table, features: &[(u32, u32)]) {
        let (rows, _) = table.weights.as_chunks::<N>();
        let mut i = 0;
        while i < features.len() {
            let index = features[i].1 as u64;
            let run = features[i..]
                .iter()
                .position(|f| f.1 as u64 != index)
                .unwrap_or(features.len() - i);
            let block = self.block(index);
            let mut acc = [0i32; N];
            for &(bucket, _) in &features[i..i + run] {
                for (a, &w) in acc.iter_mut().zip(&rows[bucket as usize]) {
                    *a += w as i32;
                }
            }
            for (b, a) in block.acc.iter_mut().zip(acc) {
                *b += a;
            }
            block.n += run as u32;
            i += run;
        }
    }

    /// The block of index `index`, created in order if it has no features yet.
    fn block(&mut self, index: u64) -> &mut Block {
        match self.blocks.iter().rposition(|b| b.index <= index) {
            Some(i) if self.blocks[i].index == index => &mut self.blocks[i],
            found => {
                let at = found.map_or(0, |i| i + 1);
                self.blocks.insert(
                    at,
                    Block {
                        index,
                        acc: [0; HEADS],
                        n: 0,
                    },
                );
                &mut self.blocks[at]
            }
        }
    }

    /// From now on, original offsets at or past `end - 1` belong to the block of `end - 1`: set
    /// at the end of input, before the normalizer's last output (its closing space, at `end`).
    pub fn set_end(&mut self, end: u64) {
        self.limit = end.saturating_sub(1);
    }

    /// Decides the windows whose blocks are complete: every feature still to come ends at or
    /// after `settled` (the normalizer's settled offset; `u64::MAX` at the end of input), except
    /// those of the word in progress. `end` is the end of input once known (then every window
    /// left is decided). Calls `on_window(start, end, probabilities)` for each.
    pub fn decide(
        &mut self,
        table: &Table,
        model: &Model,
        settled: u64,
        end: Option<u64>,
        mut on_window: impl FnMut(u64, u64, [f32; HEADS]),
    ) {
        let before = self
            .features
            .word_in_progress()
            .map_or(settled, |w| w.min(settled));
        // Blocks before `complete` can get no more features.
        let (complete, last_window) = match end {
            Some(0) => return,
            Some(e) => {
                let blocks = e.div_ceil(BLOCK_BYTES);
                (blocks, blocks.saturating_sub(2))
            }
            None => (before / BLOCK_BYTES, u64::MAX),
        };
        while self.next_window + 2 <= complete || (end.is_some() && self.next_window <= last_window)
        {
            let k = self.next_window;
            let mut acc = [0i32; HEADS];
            let mut n = 0;
            for b in self
                .blocks
                .iter()
                .filter(|b| b.index == k || b.index == k + 1)
            {
                for (a, x) in acc.iter_mut().zip(b.acc) {
                    *a += x;
                }
                n += b.n;
            }
            let start = k * BLOCK_BYTES;
            let stop = (start + 2 * BLOCK_BYTES).min(end.unwrap_or(u64::MAX));
            on_window(start, stop, model.probabilities(&table.by_label(&acc), n));
            self.next_window += 1;
            self.blocks.retain(|b| b.index > k);
        }
        if self.blocks.capacity() > 4 && self.blocks.len() <= 1 {
            self.blocks.shrink_to(2);
        }
    }
}

/// The probabilities of every window of a whole text (start, end, one per head): what a stream
/// of the text computes, without the rules. For tests, `mistguard check` and the trainer's parity
/// file.
pub fn score_text(model: &Model, text: &str) -> Vec<(u64, u64, [f32; HEADS])> {
    let table = Table::full(model);
    struct Spans {
        bytes: Vec<u8>,
        starts: Vec<u32>,
    }
    impl crate::normalize::NormSink for Spans {
        fn push(&mut self, byte: u8, orig_start: u64, _orig_len: u8) {
            self.bytes.push(byte);
            self.starts.push(orig_start as u32);
        }
    }
    let mut spans = Spans {
        bytes: Vec::new(),
        starts: Vec::new(),
    };
    let mut norm = crate::normalize::Normalizer::new();
    norm.feed(text, &mut spans);
    let mut st = LearnedState::new();
    st.consume(&table, &spans.bytes, &spans.starts);
    let seen = spans.bytes.len();
    st.set_end(text.len() as u64);
    norm.finish(&mut spans);
    st.consume(&table, &spans.bytes[seen..], &spans.starts[seen..]);
    let mut out = Vec::new();
    st.decide(
        &table,
        model,
        u64::MAX,
        Some(text.len() as u64),
        |s, e, p| out.push((s, e, p)),
    );
    out
}

fn utf8_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

impl Learned {
    /// The matches a decided window reports, by head: at or above the flag threshold, evidence
    /// that adds up with the rule's triggers, and either the alone trigger (at or above the
    /// alone threshold) or the FLAG trigger.
    pub fn window_matches(&self, start: u64, end: u64, p: &[f32; HEADS], out: &mut Vec<Match>) {
        for h in &self.heads {
            let p = p[h.label];
            let m = |trigger| Match {
                trigger,
                start,
                end,
            };
            if p < h.flag {
                continue;
            }
            // Evidence that adds up with the rule's triggers in its score window.
            out.push(m(h.add_up_trigger));
            if p >= h.alone {
                out.push(m(h.alone_trigger));
            } else if self.flag_hits {
                out.push(m(h.flag_trigger));
            }
        }
    }

    /// Whether the heads' hits add to rule `rule`'s score.
    pub fn adds_to(&self, rule: usize) -> bool {
        self.adds_to.get(rule).copied().unwrap_or(false)
    }

    /// Whether a stream's release waits for the windows still undecided: in `hold` mode, when a
    /// head can act for a rule that withholds text.
    pub fn holds_release(&self, rules: &CompiledRuleset) -> bool {
        self.mode == ModelMode::Hold
            && self
                .heads
                .iter()
                .any(|h| rules.triggers[h.alone_trigger as usize].action.withholds())
    }
}
