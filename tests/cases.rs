//! Rule cases written as data (`tests/cases/*.toml`): each case is checked whole and streamed in
//! many chunkings, against the bundled rulesets.

mod common;

use mistguard::ClassifyOptions;
use serde::Deserialize;
use std::collections::BTreeSet;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    text: String,
    lang: Option<String>,
    expect: Vec<String>,
    action: Option<String>,
    #[serde(default)]
    spans: Vec<String>,
    /// `input` or `output` (default: unspecified, treated as a prompt).
    direction: Option<String>,
    /// The exact `sanitized_text` of the whole text (and the released text of every stream).
    sanitized: Option<String>,
}

fn load_cases() -> Vec<(String, Case)> {
    // `MISTGUARD_CASES_DIR` names another directory of case files (see `engine`).
    let dir = match std::env::var_os("MISTGUARD_CASES_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases"),
    };
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let file: CaseFile =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        out.extend(file.cases.into_iter().map(|c| (name.clone(), c)));
    }
    out
}

/// The bundled rulesets, or the directory `MISTGUARD_CASES_RULESETS` names: while editing rule
/// files, the built test binary checks the cases against them without a rebuild. Rules only:
/// the cases are the rules' (the learned tier has its own tests, `tests/learned.rs`).
fn engine() -> std::sync::Arc<mistguard::Engine> {
    std::sync::Arc::new(mistguard::Engine::from_ruleset(rules()).unwrap())
}

/// The compiled rulesets the cases run against (see `engine`).
fn rules() -> mistguard::rules::CompiledRuleset {
    match std::env::var_os("MISTGUARD_CASES_RULESETS") {
        Some(dir) => mistguard::load::ruleset_dir(std::path::Path::new(&dir))
            .unwrap_or_else(|e| panic!("{e}")),
        None => mistguard::rules::load_bundled().unwrap(),
    }
}

#[test]
fn every_case_holds_whole_and_streamed() {
    let engine = engine();
    let cases = load_cases();
    assert!(
        cases.len() >= 10,
        "expected rule cases under tests/cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for (file, case) in &cases {
        let direction = match case.direction.as_deref() {
            None => mistguard::Direction::Unspecified,
            Some("input") => mistguard::Direction::Input,
            Some("output") => mistguard::Direction::Output,
            Some(other) => panic!("{file}: {}: direction {other:?}", case.name),
        };
        let opts = ClassifyOptions {
            lang_hint: case.lang.clone(),
            direction,
            ..Default::default()
        };
        let whole = engine.classify(&case.text, &opts);
        let got: BTreeSet<String> = whole.hits.iter().map(|h| h.rule_id.to_string()).collect();
        let want: BTreeSet<String> = case.expect.iter().cloned().collect();
        let where_ = format!("{file}: {}", case.name);
        if got != want {
            let triggers: Vec<&str> = whole.hits.iter().map(|h| &*h.trigger_id).collect();
            failures.push(format!(
                "{where_}: fired {got:?}, expected {want:?} (triggers {triggers:?})"
            ));
            continue;
        }
        if let Some(a) = &case.action {
            if whole.action.as_str() != a {
                failures.push(format!("{where_}: action {}, expected {a}", whole.action));
            }
        }
        if let Some(want) = &case.sanitized {
            if whole.sanitized_text.as_deref().unwrap_or(&case.text) != want {
                failures.push(format!(
                    "{where_}: sanitized {:?}, expected {want:?}",
                    whole.sanitized_text
                ));
            }
        }
        for span in &case.spans {
            let found = whole
                .hits
                .iter()
                .any(|h| case.text.get(h.start as usize..h.end as usize) == Some(span.as_str()));
            if !found {
                failures.push(format!("{where_}: no hit spans {span:?}"));
            }
        }
        // Streamed: every two-chunk split (short texts), and fixed small chunk sizes.
        let mut chunkings: Vec<Vec<&str>> = [1usize, 2, 3, 5, 7, 16]
            .iter()
            .map(|&n| common::cut(&case.text, std::iter::repeat(n)))
            .collect();
        if case.text.len() <= 400 {
            for (i, _) in case.text.char_indices().skip(1) {
                chunkings.push(vec![&case.text[..i], &case.text[i..]]);
            }
        }
        for chunks in chunkings {
            let st = common::stream(&engine, &case.text, &chunks, &opts);
            if st.hits != whole.hits
                || st.action != whole.action
                || st.sanitized != whole.sanitized_text
            {
                failures.push(format!(
                    "{where_}: streamed in {} chunks differs from whole: {:?} vs {:?}",
                    chunks.len(),
                    st.hits
                        .iter()
                        .map(|h| (&*h.trigger_id, h.start, h.end))
                        .collect::<Vec<_>>(),
                    whole
                        .hits
                        .iter()
                        .map(|h| (&*h.trigger_id, h.start, h.end))
                        .collect::<Vec<_>>()
                ));
                break;
            }
            if let Err(e) = common::check_release(&st)
                .and_then(|()| common::check_released_text(&st, &case.text, &whole))
            {
                failures.push(format!("{where_} ({} chunks): {e}", chunks.len()));
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Walkers spawned where a prefix literal is found (the default) report exactly what walkers
/// spawned at every word start report: on every case text, on pairs of case texts run together,
/// whole and in 7-byte chunks.
#[test]
fn spawn_literals_change_nothing_found() {
    let fast = engine();
    let reference = std::sync::Arc::new(
        mistguard::Engine::from_ruleset_with(
            rules(),
            &mistguard::scan::ScanConfig {
                spawn_literals: false,
            },
        )
        .unwrap(),
    );
    assert!(
        fast.scanner().stats().spawn_literals > 0
            && reference.scanner().stats().spawn_literals == 0,
        "the two engines differ in how they spawn walkers"
    );
    let cases = load_cases();
    let mut texts: Vec<String> = cases.iter().map(|c| c.1.text.clone()).collect();
    for w in cases.windows(2) {
        texts.push(format!("{} and then {}", w[0].1.text, w[1].1.text));
    }
    let key = |hits: &[mistguard::Hit]| -> Vec<(String, String, u64, u64)> {
        hits.iter()
            .map(|h| {
                (
                    h.rule_id.to_string(),
                    h.trigger_id.to_string(),
                    h.start,
                    h.end,
                )
            })
            .collect()
    };
    let word_regexes: BTreeSet<&str> = fast
        .ruleset()
        .triggers
        .iter()
        .filter(|t| {
            t.view == mistguard::rules::View::Word
                && matches!(t.kind, mistguard::rules::TriggerKind::Regex { .. })
        })
        .map(|t| &*t.id)
        .collect();
    let opts = ClassifyOptions::default();
    let mut regex_hits = 0;
    for text in &texts {
        let a = fast.classify(text, &opts);
        let b = reference.classify(text, &opts);
        assert_eq!(key(&a.hits), key(&b.hits), "{text:?}");
        assert_eq!(a.action, b.action, "{text:?}");
        regex_hits += a
            .hits
            .iter()
            .filter(|h| word_regexes.contains(&*h.trigger_id))
            .count();
        let chunks = common::cut(text, std::iter::repeat(7));
        let sa = common::stream(&fast, text, &chunks, &opts);
        let sb = common::stream(&reference, text, &chunks, &opts);
        assert_eq!(key(&sa.hits), key(&sb.hits), "streamed {text:?}");
    }
    assert!(
        regex_hits > 100,
        "the texts exercise the walkers ({regex_hits} regex hits)"
    );
}
