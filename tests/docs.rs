//! The documents a new user reads say what the code does: the README's first commands, its action
//! and rule tables, the minimum Rust version, the example corpus, the files it points at, the
//! proto as its own contract, and the licence.

mod support;

use support::manifest_path;

fn read(rel: &str) -> String {
    std::fs::read_to_string(manifest_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn the_readme_starts_with_running_the_daemon_and_the_test_suite() {
    let readme = read("README.md");
    let first_block = readme
        .split("```")
        .nth(1)
        .expect("a code block")
        .to_string();
    assert!(
        readme.find("```").unwrap() < readme.find("\n## ").unwrap_or(usize::MAX),
        "the commands come before any section"
    );
    let commands: Vec<&str> = first_block
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('#').next().unwrap().trim())
        .collect();
    assert_eq!(
        commands,
        ["cargo run --release -- serve", "cargo test --release"],
        "{first_block}"
    );
    // The CI runs the same command.
    assert!(read(".ci/run").contains("cargo test --release"));
}

#[test]
fn the_readme_says_what_each_action_asks_and_what_each_rule_covers() {
    let readme = read("README.md");
    for action in mistguard::Action::ALL {
        let name = action.as_str().to_ascii_uppercase();
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "no row for {name} in the README's action table"
        );
    }
    let engine = mistguard::Engine::bundled().unwrap();
    for rule in &engine.ruleset().rules {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| {} ", rule.id)))
            .unwrap_or_else(|| panic!("no row for {} in the README's rule table", rule.id));
        let action = rule.action.as_str().to_ascii_uppercase();
        assert!(row.contains(&format!("| {action} |")), "{row}");
    }
    assert!(readme.contains("What no rule covers"));
}

#[test]
fn the_readme_names_the_toolchain_cargo_requires() {
    let readme = read("README.md");
    let cargo = read("Cargo.toml");
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("rust-version in Cargo.toml");
    assert!(
        readme.contains(&format!("Rust {version} or later")),
        "README does not name Rust {version}"
    );
    assert!(readme.contains("C compiler"));
}

#[test]
fn the_files_the_readme_points_at_exist() {
    let readme = read("README.md");
    for word in readme.split('`') {
        let looks_like_a_path = (word.starts_with("docs/")
            || word.starts_with("deploy/")
            || word.starts_with("examples/")
            || word.starts_with("rulesets/")
            || word.starts_with("proto/")
            || word.ends_with(".md"))
            && !word.contains(' ')
            && !word.contains('*');
        if looks_like_a_path {
            assert!(manifest_path(word).exists(), "README points at {word}");
        }
    }
}

#[test]
fn the_example_corpus_is_valid_and_varied() {
    let items = mistguard::eval::read_corpus(&manifest_path("examples/corpus.jsonl")).unwrap();
    assert!(items.len() >= 30, "{}", items.len());
    let engine = mistguard::Engine::bundled().unwrap();
    let rules: Vec<&str> = engine.ruleset().rules.iter().map(|r| &*r.id).collect();
    let mut langs: Vec<&str> = items.iter().map(|i| i.lang.as_str()).collect();
    langs.sort_unstable();
    langs.dedup();
    assert!(langs.len() >= 5, "{langs:?}");
    for i in &items {
        assert!(!i.id.is_empty() && !i.text.is_empty());
        assert!(mistguard::lang::lang_id(&i.lang).is_some(), "{}", i.lang);
        for l in i.labels.iter().chain(&i.alt_labels) {
            assert!(rules.contains(&l.as_str()), "{}: {l}", i.id);
        }
    }
    assert!(items.iter().any(|i| i.labels.is_empty()));
    assert!(items.iter().any(|i| i.hard_negative()));
    let labelled: std::collections::BTreeSet<&str> = items
        .iter()
        .flat_map(|i| i.labels.iter().map(String::as_str))
        .collect();
    assert!(labelled.len() >= 8, "{labelled:?}");
}

#[test]
fn the_proto_is_its_own_contract_and_the_licence_is_there() {
    let proto = read("proto/mistguard/v1/guard.proto");
    assert!(
        !proto.contains("SPEC.md"),
        "the proto refers to a document it does not ship"
    );
    let license = read("LICENSE");
    assert!(license.contains("Apache License"));
    assert!(license.contains("Version 2.0, January 2004"));
    assert!(read("Cargo.toml").contains("license = \"Apache-2.0\""));
    for doc in ["CHANGELOG.md", "SECURITY.md"] {
        assert!(!read(doc).trim().is_empty(), "{doc}");
    }
}
