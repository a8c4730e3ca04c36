//! Shared by the integration tests: the bundled engine, compiled once per test binary.

#![allow(dead_code)]

use mistguard::{ClassifyOptions, Engine, Hit, StepResult};
use std::sync::{Arc, OnceLock};

pub fn bundled() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            Arc::new(Engine::bundled().unwrap_or_else(|e| panic!("bundled rulesets: {e}")))
        })
        .clone()
}

/// The bundled rulesets without the learned tier: for what the rules alone do (their release
/// bounds, their state).
pub fn rules_only() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            Arc::new(Engine::from_ruleset(mistguard::rules::load_bundled().unwrap()).unwrap())
        })
        .clone()
}

/// Cuts `text` at the given byte offsets (each moved down to a char boundary).
pub fn cut(text: &str, sizes: impl IntoIterator<Item = usize>) -> Vec<&str> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut sizes = sizes.into_iter();
    while at < text.len() {
        let n = sizes.next().unwrap_or(usize::MAX).max(1);
        let mut end = at.saturating_add(n).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(&text[at..end]);
        at = end;
    }
    out
}

/// What a stream reports: every step's hits and release offset, and the final verdict's hits.
pub struct Streamed {
    pub steps: Vec<StepResult>,
    pub hits: Vec<Hit>,
    pub action: mistguard::Action,
    pub sanitized: Option<String>,
    /// Every step's `released_text`, concatenated.
    pub released: String,
}

pub fn stream(
    engine: &Arc<Engine>,
    text: &str,
    chunks: &[&str],
    opts: &ClassifyOptions,
) -> Streamed {
    let mut s = engine.session(opts);
    s.compose_released_text();
    let mut steps = Vec::new();
    for c in chunks {
        steps.push(s.feed(c));
    }
    steps.push(s.finish());
    let v = s.verdict(Some(text));
    let released = steps
        .iter()
        .map(|st| st.released_text.as_deref().expect("composed"))
        .collect();
    Streamed {
        steps,
        hits: v.hits,
        action: v.action,
        sanitized: v.sanitized_text,
        released,
    }
}

/// Checks the release contract of a stream: offsets never decrease, and no withheld hit is
/// reported with a start before an offset released in an earlier step.
pub fn check_release(st: &Streamed) -> Result<(), String> {
    let mut released = 0u64;
    for (i, step) in st.steps.iter().enumerate() {
        for h in &step.hits {
            if h.action.withholds() && h.start < released {
                return Err(format!(
                    "step {i}: hit {} at {}..{} reported after {released} bytes were released",
                    h.trigger_id, h.start, h.end
                ));
            }
        }
        if step.release_offset < released {
            return Err(format!(
                "step {i}: release went back from {released} to {}",
                step.release_offset
            ));
        }
        released = step.release_offset;
    }
    Ok(())
}

/// What a client that prints only `released_text` shows, when the whole text's verdict lets the
/// text through (SANITIZE or less): the whole text's `sanitized_text`, or the text itself.
pub fn check_released_text(
    st: &Streamed,
    text: &str,
    whole: &mistguard::Verdict,
) -> Result<(), String> {
    if whole.action > mistguard::Action::Sanitize {
        return Ok(());
    }
    let want = whole.sanitized_text.as_deref().unwrap_or(text);
    if st.released != want {
        return Err(format!(
            "released text {:?} differs from the whole text's {want:?}",
            st.released
        ));
    }
    Ok(())
}
