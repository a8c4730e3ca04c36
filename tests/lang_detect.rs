//! The vendored whatlang (vendor/whatlang, see MISTGUARD.md there) computes trigram distances
//! through an inverted index. These tests hold it to the original computation, which the `dev`
//! feature keeps behind a switch: same language, script and confidence, to the bit.
//!
//! One test per binary, because the switch is process-wide.

use proptest::prelude::*;
use std::sync::atomic::Ordering;
use whatlang::dev::REFERENCE_SCORING;

fn both(text: &str) -> (Option<whatlang::Info>, Option<whatlang::Info>) {
    REFERENCE_SCORING.store(false, Ordering::SeqCst);
    let fast = whatlang::detect(text);
    REFERENCE_SCORING.store(true, Ordering::SeqCst);
    let reference = whatlang::detect(text);
    REFERENCE_SCORING.store(false, Ordering::SeqCst);
    (fast, reference)
}

/// Every `text = "..."` of the rule cases: 27 languages, hits and near-misses.
fn case_texts() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut texts = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        for case in doc["case"].as_array().unwrap() {
            texts.push(case["text"].as_str().unwrap().to_string());
        }
    }
    texts
}

/// A tiny deterministic generator, so the word salads are the same on every run.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

#[test]
fn fast_trigram_scores_match_the_original() {
    let texts = case_texts();
    assert!(texts.len() > 1000, "only {} case texts", texts.len());
    let words: Vec<&str> = texts.iter().flat_map(|t| t.split_whitespace()).collect();
    let mut rng = Lcg(7);
    let mut probes: Vec<String> = Vec::new();
    for t in &texts {
        probes.push(t.clone());
        // The engine detects on a prefix of at most 128 bytes.
        let mut end = t.len().min(128);
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        probes.push(t[..end].to_string());
    }
    // Word salads: neighbours from one case, then from anywhere (mixed languages and scripts).
    for i in 0..3000 {
        let n = 1 + rng.next(40);
        let start = rng.next(words.len());
        let salad: Vec<&str> = (0..n)
            .map(|k| {
                if i % 2 == 0 {
                    words[(start + k) % words.len()]
                } else {
                    words[rng.next(words.len())]
                }
            })
            .collect();
        probes.push(salad.join(" "));
    }

    let mut detected = std::collections::BTreeMap::<String, usize>::new();
    for p in &probes {
        let (fast, reference) = both(p);
        assert_eq!(fast, reference, "text: {p:?}");
        if let Some(info) = fast {
            *detected.entry(info.lang().code().to_string()).or_default() += 1;
        }
    }
    // The comparison covered many languages, not one script's worth of text.
    assert!(detected.len() >= 25, "languages seen: {detected:?}");

    // And arbitrary strings, over Latin, Cyrillic, Arabic, Devanagari and Hebrew letters (the
    // scripts scored by trigrams), with digits, punctuation and spaces.
    let letters = "[a-zA-Zàâçéèêëîïôûùüÿñæœßäöåøąćęłńśźżčďěňřšťůž \u{400}-\u{4FF}\u{600}-\u{6FF}\u{900}-\u{97F}\u{5D0}-\u{5EA}0-9.,!?'-]{0,200}";
    proptest!(ProptestConfig::with_cases(2000), |(s in letters)| {
        let (fast, reference) = both(&s);
        prop_assert_eq!(fast, reference);
    });
}
