//! The layering of the crate, checked from its sources (docs/ARCHITECTURE.md, "Invariants"):
//!
//! - only `src/daemon/` touches tonic and prost;
//! - the core does no I/O: the network, the filesystem, processes, HTTP clients and Redis are
//!   only in the edges (`daemon/`, `io/`, `load.rs`, `eval.rs`, `main.rs`);
//! - the core's modules import each other without a circle, and nothing below `engine` imports
//!   it (arrows run `engine → scan → score`, `engine → decide`, all of them → `verdict`).
//!
//! Comments are stripped before looking, so a doc link does not count as an import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules (or files) that are edges: they may do I/O.
const EDGES: &[&str] = &["daemon", "io", "load", "eval", "main"];

/// What only some modules may name, and which.
const RESTRICTED: &[(&str, &[&str])] = &[
    ("tonic", &["daemon"]),
    ("prost", &["daemon"]),
    ("tokio::net", &["daemon", "io"]),
    ("std::net", &["daemon", "io"]),
    ("reqwest", &["io"]),
    ("hyper", &["daemon", "io"]),
    ("redis", &["daemon", "io"]),
    ("std::fs", EDGES),
    ("std::process", &["daemon", "io", "main"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a source file belongs to (`src/scan/word.rs` → `scan`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The code of a file without its comments (line comments and doc comments; block comments are
/// not used in this crate) and without string literals' contents.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
                kept.push('"');
            } else if !in_str {
                kept.push(c);
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// Whether `code` names `path` as a path (not as part of a longer identifier).
fn names(code: &str, path: &str) -> bool {
    code.match_indices(path).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = code[i + path.len()..].chars().next();
        let ident = |c: char| c.is_alphanumeric() || c == '_';
        !before.is_some_and(|c| ident(c) && c != ':') && !after.is_some_and(ident)
    })
}

struct Sources {
    /// (module, file, code without comments)
    files: Vec<(String, PathBuf, String)>,
}

fn sources() -> Sources {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths.sort();
    let files = paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (module_of(&src, &p), p, code_of(&text))
        })
        .collect();
    Sources { files }
}

#[test]
fn io_and_transport_crates_stay_in_the_edges() {
    let s = sources();
    assert!(s.files.len() > 10, "the sources were found");
    let mut broken = Vec::new();
    for (module, file, code) in &s.files {
        for (what, allowed) in RESTRICTED {
            if names(code, what) && !allowed.contains(&module.as_str()) {
                broken.push(format!("{} names `{what}`", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The import graph between the core's top-level modules.
fn core_imports(s: &Sources) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = s.files.iter().map(|f| f.0.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, _, code) in &s.files {
        if EDGES.contains(&module.as_str()) || module == "lib" {
            continue;
        }
        let deps = graph.entry(module.clone()).or_default();
        for other in &modules {
            if other != module && names(code, &format!("crate::{other}")) {
                deps.insert(other.clone());
            }
        }
    }
    graph
}

#[test]
fn the_core_has_no_import_circle_and_nothing_below_the_engine_imports_it() {
    let s = sources();
    let graph = core_imports(&s);
    for must in [
        "engine",
        "scan",
        "score",
        "decide",
        "verdict",
        "normalize",
        "lang",
    ] {
        assert!(graph.contains_key(must), "core module {must} was found");
    }
    // The arrows the architecture names.
    assert!(graph["engine"].contains("scan"));
    assert!(graph["engine"].contains("decide"));
    assert!(graph["scan"].contains("score"));
    for (m, deps) in &graph {
        assert!(
            !deps.contains("engine") || m == "engine",
            "{m} imports engine: move what it needs below the engine"
        );
        for edge in EDGES {
            assert!(
                !deps.contains(*edge) || (m == "engine" && *edge == "load"),
                "core module {m} imports the edge module {edge}"
            );
        }
    }
    // Depth-first search for a circle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            panic!("import circle: {} -> {m}", path[at..].join(" -> "));
        }
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, path, done);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_checks_catch_what_they_look_for() {
    // The helpers themselves: a comment or a string does not count, a path does.
    assert!(names(&code_of("use tonic::Status;"), "tonic"));
    assert!(!names(&code_of("// tonic::Status"), "tonic"));
    assert!(!names(&code_of("let s = \"tonic::Status\";"), "tonic"));
    assert!(!names(&code_of("use my_tonic::X;"), "tonic"));
    assert!(names(
        &code_of("let x = crate::engine::Hit;"),
        "crate::engine"
    ));
    assert!(!names(
        &code_of("let x = crate::engines::Hit;"),
        "crate::engine"
    ));
}
