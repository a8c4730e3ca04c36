//! Reading what the engine is built from off the disk: a rulesets directory.
//!
//! The core parses and compiles from memory (`rules::load_files`); this module is where the
//! files come from, so that the rest of the core does no I/O. The daemon, the CLI and `eval`
//! are the other places that touch the filesystem or the network.

use crate::rules::{load_files, CompiledRuleset, LoadError};
use std::path::{Path, PathBuf};

/// Loads every `*.toml` in `dir` as a ruleset.
///
/// # Errors
/// The first problem found, with file and line.
pub fn ruleset_dir(dir: &Path) -> Result<CompiledRuleset, LoadError> {
    let err = |m: String| LoadError {
        file: dir.display().to_string(),
        line: None,
        message: m,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| err(format!("cannot read directory: {e}")))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p).map_err(|e| LoadError {
            file: p.display().to_string(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        files.push((p.display().to_string(), text));
    }
    load_files(&files, &dir.display().to_string())
}
