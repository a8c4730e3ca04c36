//! Reading what the engine is built from off the disk: a rulesets directory and a models
//! directory.
//!
//! The core parses and compiles from memory (`rules::load_files`); this module is where the
//! files come from, so that the rest of the core does no I/O. The daemon, the CLI and `eval`
//! are the other places that touch the filesystem or the network.

use crate::engine::Engine;
use crate::learned::Model;
use crate::rules::{load_files, CompiledRuleset, LoadError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The model file's name in a models directory.
pub const MODEL_FILE: &str = "mistguard-model.bin";

/// Which model the learned tier uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Models {
    /// The model compiled into the binary (`models/` at build time).
    #[default]
    Bundled,
    /// No learned tier: the rules alone.
    Off,
    /// [`MODEL_FILE`] in this directory.
    Dir(PathBuf),
}

impl Models {
    /// `bundled` (or empty), `off`, or a directory.
    pub fn parse(s: &str) -> Models {
        match s {
            "" | "bundled" => Models::Bundled,
            "off" => Models::Off,
            d => Models::Dir(PathBuf::from(d)),
        }
    }
}

impl std::fmt::Display for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Models::Bundled => f.write_str("bundled"),
            Models::Off => f.write_str("off"),
            Models::Dir(d) => write!(f, "{}", d.display()),
        }
    }
}

/// Loads the model `m` names (`None` when off).
///
/// # Errors
/// A missing or unreadable file, or one the model loader refuses (corrupt, another format).
pub fn model(m: &Models) -> Result<Option<Arc<Model>>, LoadError> {
    let (bytes, name): (std::borrow::Cow<'_, [u8]>, String) = match m {
        Models::Off => return Ok(None),
        Models::Bundled => (
            crate::learned::BUNDLED_MODEL.into(),
            "<bundled>/models/mistguard-model.bin".into(),
        ),
        Models::Dir(d) => {
            let path = d.join(MODEL_FILE);
            let bytes = std::fs::read(&path).map_err(|e| LoadError {
                file: path.display().to_string(),
                line: None,
                message: format!("cannot read the model: {e}"),
            })?;
            (bytes.into(), path.display().to_string())
        }
    };
    Model::from_bytes(&bytes, &name)
        .map(|m| Some(Arc::new(m)))
        .map_err(|e| LoadError {
            file: e.file,
            line: None,
            message: e.message,
        })
}

/// The engine of a rulesets directory (`None`: the bundled rulesets) and a model.
///
/// # Errors
/// The first problem found in either, with its file (and line, for rule files).
pub fn engine(rulesets: Option<&Path>, models: &Models) -> Result<Engine, LoadError> {
    let rules = match rulesets {
        Some(d) => ruleset_dir(d)?,
        None => crate::rules::load_bundled()?,
    };
    Engine::new(rules, model(models)?)
}

/// Loads every `*.toml` in `dir` as a ruleset.
///
/// # Errors
/// The first problem found, with file and line.
pub fn ruleset_dir(dir: &Path) -> Result<CompiledRuleset, LoadError> {
    let files =
        files_in(dir, &["toml"], |p| p.display().to_string()).map_err(|(file, message)| {
            LoadError {
                file,
                line: None,
                message,
            }
        })?;
    load_files(&files, &dir.display().to_string())
}

/// The files of `dir` (not its subdirectories) with one of `extensions`, in path order, as
/// (`name(path)`, text); an error names the directory or the file, and why.
fn files_in(
    dir: &Path,
    extensions: &[&str],
    name: impl Fn(&Path) -> String,
) -> Result<Vec<(String, String)>, (String, String)> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        (
            dir.display().to_string(),
            format!("cannot read directory: {e}"),
        )
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| extensions.iter().any(|e| x == *e))
        })
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p)
            .map_err(|e| (p.display().to_string(), format!("cannot read: {e}")))?;
        files.push((name(&p), text));
    }
    Ok(files)
}

/// Loads every `*.yaml` / `*.yml` file in `dir` (not its subdirectories) as tool-call policies.
///
/// # Errors
/// An unreadable directory or file, or the first file the policy loader refuses (file, line).
pub fn policy_dir(dir: &Path) -> Result<crate::policy::PolicySet, crate::policy::PolicyError> {
    // The loader names a file `<dir>/<name>` in its errors.
    let files = files_in(dir, &["yaml", "yml"], |p| {
        p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().to_string(),
        )
    })
    .map_err(|(file, message)| crate::policy::PolicyError {
        file,
        line: None,
        message,
    })?;
    crate::policy::PolicySet::load(&files, &dir.display().to_string())
}
