//! Fuzz stand-ins that run in CI: the ruleset loader and the normalizer never panic, whatever
//! they are given, and the normalizer gives the same output however its input is cut.

use mistguard::normalize::{normalize, Normalizer};
use mistguard::rules::load_files;
use proptest::prelude::*;

const POLICY: &str = "version = \"t\"\n[rules.\"RULE-MIST-009\"]\naction = \"sanitize\"\n";
const RULE: &str = "rule = \"RULE-MIST-009\"\nname = \"x\"\n[[trigger]]\nid = \"a\"\nlang = \"en\"\nphrases = [\"ignore previous instructions\"]\n[[trigger]]\nid = \"b\"\nlang = \"neutral\"\nregex = 'x{1,5}y'\n";

fn load(policy: &str, rule: &str) -> Result<(), String> {
    let files = vec![
        ("policy.toml".to_string(), policy.to_string()),
        ("mist-009.toml".to_string(), rule.to_string()),
    ];
    let rs = load_files(&files, "fuzz").map_err(|e| e.to_string())?;
    mistguard::Engine::from_ruleset(rs)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn loader_never_panics_on_mutated_files(pos in 0usize..RULE.len(), junk in "\\PC{0,12}", cut in any::<bool>()) {
        let mut rule = RULE.to_string();
        let mut p = pos.min(rule.len());
        while !rule.is_char_boundary(p) { p -= 1; }
        if cut { rule.truncate(p); } else { rule.insert_str(p, &junk); }
        let _ = load(POLICY, &rule);
    }

    #[test]
    fn loader_never_panics_on_random_regexes(re in "\\PC{0,24}") {
        let rule = format!("rule = \"RULE-MIST-009\"\nname = \"x\"\n[[trigger]]\nid = \"a\"\nlang = \"en\"\nregex = {re:?}\n");
        let _ = load(POLICY, &rule);
        let raw = rule.replace("lang = \"en\"", "lang = \"neutral\"");
        let _ = load(POLICY, &raw);
    }

    #[test]
    fn normalizer_is_total_and_cut_invariant(text in "\\PC{0,40}", cuts in prop::collection::vec(0usize..40, 0..4)) {
        let whole = normalize(&text);
        let mut n = Normalizer::new();
        let mut out = Vec::new();
        let mut at = 0;
        let mut cuts = cuts;
        cuts.sort();
        for c in cuts {
            let mut c = c.min(text.len()).max(at);
            while !text.is_char_boundary(c) { c += 1; }
            n.feed(&text[at..c], &mut out);
            at = c;
        }
        n.feed(&text[at..], &mut out);
        n.finish(&mut out);
        prop_assert_eq!(String::from_utf8(out).unwrap(), whole);
    }
}

#[test]
fn the_loader_refuses_what_would_hurt_with_file_and_line() {
    let cases: &[(&str, &str)] = &[
        ("phrases = [\"   \"]", "empty"),
        ("regex = 'ignore.*'", "without bound"),
        ("regex = 'a{5}{5}{5}{5}{5}{5}'", "maximum length"),
        ("regex = '\\bkill\\b'", "Unicode word boundary"),
        ("regex = 'précédent'", "normalization"),
    ];
    for (body, why) in cases {
        let rule = format!("rule = \"RULE-MIST-009\"\nname = \"x\"\n\n[[trigger]]\nid = \"a\"\nlang = \"fr\"\n{body}\n");
        let err = load(POLICY, &rule).expect_err(body);
        assert!(err.contains(why), "{body}: {err}");
        assert!(err.starts_with("mist-009.toml:"), "{err}");
    }
    // The bomb is refused for its size even when the file raises the bound.
    let rule = "rule = \"RULE-MIST-009\"\nname = \"x\"\nmax_match_len = 1024\n[[trigger]]\nid = \"a\"\nlang = \"neutral\"\nmax_len = 1024\nregex = '(?:a{5}{5}{5}{5}{5}){4}'\n";
    let err = load(POLICY, rule).expect_err("bomb");
    assert!(
        err.contains("maximum length") || err.contains("too large"),
        "{err}"
    );
    let rule = "rule = \"RULE-MIST-009\"\nname = \"x\"\n[[trigger]]\nid = \"a\"\nlang = \"xx\"\nphrases = [\"a\"]\n";
    assert!(load(POLICY, rule)
        .unwrap_err()
        .contains("unknown language `xx`"));
    let dup = format!("{RULE}[[trigger]]\nid = \"a\"\nlang = \"en\"\nphrases = [\"b\"]\n");
    assert!(load(POLICY, &dup)
        .unwrap_err()
        .contains("duplicate trigger id"));
    for policy in [
        "version = \"t\"\nscore_window = 0\n[rules.\"RULE-MIST-009\"]\naction = \"sanitize\"\n",
        "version = \"t\"\n[rules.\"RULE-MIST-009\"]\naction = \"sanitize\"\nwindow = 0\n",
        // Refused even where every rule sets its own.
        "version = \"t\"\nscore_window = 0\n[rules.\"RULE-MIST-009\"]\naction = \"sanitize\"\nwindow = 9\n",
    ] {
        let err = load(policy, RULE).unwrap_err();
        assert!(
            err.starts_with("policy.toml:") && err.contains("at least 1 byte"),
            "{err}"
        );
    }
    assert!(load(
        "version = \"t\"\n[rules.\"RULE-MIST-009\"]\naction = \"sanitize\"\nwindow = -3\n",
        RULE
    )
    .unwrap_err()
    .starts_with("policy.toml:"));
    let lowered = "version = \"t\"\n[rules.\"RULE-MIST-006\"]\naction = \"block\"\n";
    let files = vec![("policy.toml".to_string(), lowered.to_string())];
    assert!(load_files(&files, "x")
        .unwrap_err()
        .to_string()
        .contains("hard_block"));
}

/// A regex's bound is what it can really match when that is less than its `max_len`: the rings,
/// release offsets and confirmation windows follow it.
#[test]
fn a_regex_is_bounded_by_its_longest_match() {
    let rule = "rule = \"RULE-MIST-009\"\nname = \"x\"\n[[trigger]]\nid = \"w\"\nlang = \"en\"\nregex = ' (?:ignore|disregard) (?:all )?rules '\nmax_len = 200\n[[trigger]]\nid = \"a\"\nlang = \"neutral\"\nanchors = [\"key=\"]\nregex = 'key=[0-9a-f]{8,32}'\nmax_len = 200\nlook_behind = 100\n";
    let files = vec![
        ("policy.toml".to_string(), POLICY.to_string()),
        ("mist-009.toml".to_string(), rule.to_string()),
    ];
    let rs = load_files(&files, "t").unwrap();
    let kinds: Vec<_> = rs.triggers.iter().map(|t| t.kind.clone()).collect();
    match &kinds[0] {
        mistguard::rules::TriggerKind::Regex { max_len, .. } => assert_eq!(*max_len, 21),
        k => panic!("{k:?}"),
    }
    match &kinds[1] {
        mistguard::rules::TriggerKind::Anchored {
            max_len,
            look_behind,
            ..
        } => assert_eq!((*max_len, *look_behind), (36, 36)),
        k => panic!("{k:?}"),
    }
    let engine = mistguard::Engine::from_ruleset(rs).unwrap();
    assert!(
        engine.scanner().holdback_bound() < 100,
        "{}",
        engine.scanner().holdback_bound()
    );
}

/// A trigger may lower its rule's action for its own hits (RULE-MIST-004's statements of despair
/// flag, its requests for methods block): the verdict is the most severe hit, the message the
/// rule's. Raising is refused, and so is lowering RULE-MIST-005 or 006.
#[test]
fn a_trigger_may_lower_its_rules_action() {
    let policy = "version = \"t\"\n[rules.\"RULE-MIST-004\"]\naction = \"block\"\n";
    let rule = "rule = \"RULE-MIST-004\"\nname = \"x\"\n[messages]\nen = \"help is here\"\n\
                [[trigger]]\nid = \"intent\"\nlang = \"en\"\naction = \"flag\"\nphrases = [\"i want to die\"]\n\
                [[trigger]]\nid = \"method\"\nlang = \"en\"\nphrases = [\"how do i kill myself\"]\n";
    let files = vec![
        ("policy.toml".to_string(), policy.to_string()),
        ("mist-004.toml".to_string(), rule.to_string()),
    ];
    let engine = std::sync::Arc::new(
        mistguard::Engine::from_ruleset(load_files(&files, "t").unwrap()).unwrap(),
    );
    let opts = mistguard::ClassifyOptions {
        lang_hint: Some("en".into()),
        ..Default::default()
    };
    let v = engine.classify("I want to die.", &opts);
    assert_eq!(v.action, mistguard::Action::Flag);
    assert_eq!(v.hits[0].action, mistguard::Action::Flag);
    assert_eq!(v.message.as_deref(), Some("help is here"));
    let v = engine.classify("I want to die. How do I kill myself?", &opts);
    assert_eq!(v.action, mistguard::Action::Block);
    // Streamed, the flag comes first and the block raises it.
    let mut s = engine.session(&opts);
    let mut actions = Vec::new();
    for chunk in ["I want to die. ", "Tell me now. ", "How do I kill myself?"] {
        actions.push(s.feed(chunk).action);
    }
    actions.push(s.finish().action);
    assert!(actions.contains(&mistguard::Action::Flag));
    assert_eq!(*actions.last().unwrap(), mistguard::Action::Block);

    let raised = rule.replace("action = \"flag\"", "action = \"hard_block\"");
    let err = load(policy, &raised).unwrap_err();
    assert!(err.contains("not raise it"), "{err}");
    let unknown = rule.replace("action = \"flag\"", "action = \"shout\"");
    assert!(load(policy, &unknown)
        .unwrap_err()
        .contains("unknown action"));
    let csam_policy = "version = \"t\"\n[rules.\"RULE-MIST-005\"]\naction = \"block\"\n";
    let csam = rule.replace("RULE-MIST-004", "RULE-MIST-005");
    let files = vec![
        ("policy.toml".to_string(), csam_policy.to_string()),
        ("mist-005.toml".to_string(), csam),
    ];
    let err = load_files(&files, "t").unwrap_err().to_string();
    assert!(err.contains("cannot be lowered"), "{err}");
}
