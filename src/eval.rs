//! `mistguard eval`: runs a labelled corpus through the engine and reports detection quality.
//!
//! Corpus format (JSON lines): `{"id", "text", "lang", "labels": [...], "alt_labels": [...],
//! "meta": {"hard_negative": bool, "label_quality": "noisy"}}`. A text counts as flagged for a
//! rule when the verdict has a hit for that rule; a predicted rule listed in `alt_labels` counts
//! as neither a true nor a false positive.

use crate::engine::{ClassifyOptions, Engine};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    #[serde(default)]
    pub id: String,
    pub text: String,
    #[serde(default)]
    pub lang: String,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub alt_labels: Vec<String>,
    #[serde(default)]
    pub meta: serde_json::Value,
}

impl Item {
    pub fn hard_negative(&self) -> bool {
        self.meta
            .get("hard_negative")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }
    pub fn noisy(&self) -> bool {
        self.meta.get("label_quality").and_then(|v| v.as_str()) == Some("noisy")
    }
}

/// Reads a corpus, with the line number of any malformed line.
///
/// # Errors
/// A message naming the file and line.
pub fn read_corpus(path: &std::path::Path) -> Result<Vec<Item>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut items = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let item: Item = serde_json::from_str(&line)
            .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        items.push(item);
    }
    Ok(items)
}

/// What the engine said about one item.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub predicted: BTreeSet<String>,
    pub triggers: Vec<String>,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Counts {
    pub tp: u64,
    pub fp: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
}

impl Counts {
    pub fn precision(&self) -> Option<f64> {
        let d = self.tp + self.fp;
        (d > 0).then(|| self.tp as f64 / d as f64)
    }
    pub fn recall(&self) -> Option<f64> {
        let d = self.tp + self.fn_;
        (d > 0).then(|| self.tp as f64 / d as f64)
    }
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Rate {
    pub flagged: u64,
    pub total: u64,
}

impl Rate {
    pub fn rate(&self) -> Option<f64> {
        (self.total > 0).then(|| self.flagged as f64 / self.total as f64)
    }
}

/// The report, for all items and for items whose labels are not marked noisy.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub items: u64,
    pub per_rule: BTreeMap<String, Counts>,
    pub per_rule_clean: BTreeMap<String, Counts>,
    pub benign_fpr: Rate,
    pub benign_fpr_per_lang: BTreeMap<String, Rate>,
    pub hard_negative_fpr: Rate,
    /// Benign false positives by the rule that caused them.
    pub benign_fp_by_rule: BTreeMap<String, u64>,
    pub per_lang_recall: BTreeMap<String, Counts>,
}

/// Classifies every item (in parallel) and returns the outcomes in order.
pub fn run(engine: &Arc<Engine>, items: &[Item], use_lang_hint: bool) -> Vec<Outcome> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let chunk = items.len().div_ceil(threads).max(1);
    let mut out: Vec<Outcome> = Vec::with_capacity(items.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                let engine = engine.clone();
                s.spawn(move || {
                    part.iter()
                        .map(|it| {
                            let opts = ClassifyOptions {
                                lang_hint: (use_lang_hint && !it.lang.is_empty())
                                    .then(|| it.lang.clone()),
                                ..Default::default()
                            };
                            let v = engine.classify(&it.text, &opts);
                            Outcome {
                                predicted: v.hits.iter().map(|h| h.rule_id.to_string()).collect(),
                                triggers: v.hits.iter().map(|h| h.trigger_id.to_string()).collect(),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            out.extend(h.join().expect("eval worker panicked"));
        }
    });
    out
}

pub fn score(items: &[Item], outcomes: &[Outcome]) -> Report {
    let mut r = Report {
        items: items.len() as u64,
        ..Report::default()
    };
    for (it, o) in items.iter().zip(outcomes) {
        let labels: BTreeSet<&str> = it.labels.iter().map(|s| s.as_str()).collect();
        let alt: BTreeSet<&str> = it.alt_labels.iter().map(|s| s.as_str()).collect();
        let mut rules: BTreeSet<&str> = labels.clone();
        rules.extend(o.predicted.iter().map(|s| s.as_str()));
        for rule in rules {
            let p = o.predicted.contains(rule);
            let l = labels.contains(rule);
            let mut c = Counts::default();
            match (p, l) {
                (true, true) => c.tp = 1,
                (true, false) if !alt.contains(rule) => c.fp = 1,
                (false, true) => c.fn_ = 1,
                _ => {}
            }
            add(r.per_rule.entry(rule.to_string()).or_default(), c);
            if !it.noisy() {
                add(r.per_rule_clean.entry(rule.to_string()).or_default(), c);
            }
            if l {
                add(r.per_lang_recall.entry(it.lang.clone()).or_default(), c);
            }
        }
        if labels.is_empty() {
            let fps: Vec<&String> = o
                .predicted
                .iter()
                .filter(|p| !alt.contains(p.as_str()))
                .collect();
            let flagged = !fps.is_empty();
            for p in &fps {
                *r.benign_fp_by_rule.entry(p.to_string()).or_default() += 1;
            }
            bump(&mut r.benign_fpr, flagged);
            bump(
                r.benign_fpr_per_lang.entry(it.lang.clone()).or_default(),
                flagged,
            );
            if it.hard_negative() {
                bump(&mut r.hard_negative_fpr, flagged);
            }
        }
    }
    r
}

fn add(a: &mut Counts, b: Counts) {
    a.tp += b.tp;
    a.fp += b.fp;
    a.fn_ += b.fn_;
}

fn bump(r: &mut Rate, flagged: bool) {
    r.total += 1;
    r.flagged += flagged as u64;
}

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

fn frac(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}

/// The report as text tables.
pub fn render(r: &Report, only_rule: Option<&str>) -> String {
    let mut s = String::new();
    s.push_str(&format!("items: {}\n\n", r.items));
    s.push_str(
        "rule            precision  recall    tp    fp    fn   | clean: precision  recall\n",
    );
    for (rule, c) in &r.per_rule {
        if only_rule.is_some_and(|o| o != rule) {
            continue;
        }
        let cc = r.per_rule_clean.get(rule).copied().unwrap_or_default();
        s.push_str(&format!(
            "{rule:<15} {:>9} {:>7} {:>5} {:>5} {:>5}   |        {:>9} {:>7}\n",
            frac(c.precision()),
            frac(c.recall()),
            c.tp,
            c.fp,
            c.fn_,
            frac(cc.precision()),
            frac(cc.recall())
        ));
    }
    s.push_str(&format!(
        "\nbenign false-positive rate: {} ({} of {})\nhard negatives:             {} ({} of {})\n",
        pct(r.benign_fpr.rate()),
        r.benign_fpr.flagged,
        r.benign_fpr.total,
        pct(r.hard_negative_fpr.rate()),
        r.hard_negative_fpr.flagged,
        r.hard_negative_fpr.total
    ));
    s.push_str("\nbenign FPR per language:\n");
    for (l, rate) in &r.benign_fpr_per_lang {
        s.push_str(&format!(
            "  {l:<4} {:>6} ({} of {})\n",
            pct(rate.rate()),
            rate.flagged,
            rate.total
        ));
    }
    s.push_str("\nbenign false positives by rule:\n");
    for (rule, n) in &r.benign_fp_by_rule {
        s.push_str(&format!("  {rule:<15} {n}\n"));
    }
    s.push_str("\nrecall per language (all labelled rules):\n");
    for (l, c) in &r.per_lang_recall {
        s.push_str(&format!(
            "  {l:<4} {:>7} ({} of {})\n",
            frac(c.recall()),
            c.tp,
            c.tp + c.fn_
        ));
    }
    s
}

/// Lines listing false positives (`fp = true`) or misses of `rule`.
pub fn list(items: &[Item], outcomes: &[Outcome], rule: &str, fp: bool) -> String {
    let mut s = String::new();
    for (it, o) in items.iter().zip(outcomes) {
        let p = o.predicted.contains(rule);
        let l = it.labels.iter().any(|x| x == rule);
        let alt = it.alt_labels.iter().any(|x| x == rule);
        let show = if fp { p && !l && !alt } else { l && !p };
        if show {
            let text: String = it
                .text
                .chars()
                .take(240)
                .collect::<String>()
                .replace('\n', " ");
            s.push_str(&format!(
                "{}\t{}\t{}{}\t[{}]\t{}\n",
                it.id,
                it.lang,
                if it.labels.is_empty() {
                    "benign"
                } else {
                    "labelled"
                },
                if it.hard_negative() { ",hard" } else { "" },
                o.triggers.join(","),
                text
            ));
        }
    }
    s
}
