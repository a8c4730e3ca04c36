//! Policy files: the YAML format, its validation, and where in the text an error is.

use super::expr::{self, When};
use super::glob::Glob;
use super::{PolicyError, ToolAction};
use cel::Env;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    version: Option<serde_norway::Value>,
    rules: Vec<RuleDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    name: String,
    #[serde(default)]
    description: Option<String>,
    tool: String,
    /// `when:` written with no value is refused rather than read as "always".
    #[serde(default, deserialize_with = "present")]
    when: Option<Option<String>>,
    action: String,
    #[serde(default)]
    approvers: Option<Vec<String>>,
    #[serde(default)]
    message: Option<String>,
}

/// A field that may be left out, but not written empty.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// A compiled rule.
pub(crate) struct Rule {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) tool: Glob,
    pub(crate) when: Option<When>,
    pub(crate) action: ToolAction,
    pub(crate) approvers: Vec<String>,
    pub(crate) message: Option<String>,
    /// Where it was written: the file and the 1-based line of its `name:`.
    pub(crate) file: String,
    pub(crate) line: Option<usize>,
}

/// One file's rules and its `version:`.
pub(crate) struct Parsed {
    pub(crate) version: Option<String>,
    pub(crate) rules: Vec<Rule>,
}

fn err(file: &str, line: Option<usize>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        file: file.to_string(),
        line,
        message: message.into(),
    }
}

/// The message of a serde_norway error without its " at line L column C" (the line is reported
/// on its own), on one line.
fn yaml_message(e: &serde_norway::Error) -> String {
    let full = e.to_string();
    let words: Vec<&str> = full.split_whitespace().collect();
    let mut out: Vec<&str> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        // Drop every "at line L column C" (with the comma that may follow it).
        let number = |w: &str| {
            let w = w.trim_end_matches(',');
            !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit())
        };
        if words[i] == "at"
            && words.get(i + 1) == Some(&"line")
            && words.get(i + 2).is_some_and(|w| number(w))
            && words.get(i + 3) == Some(&"column")
            && words.get(i + 4).is_some_and(|w| number(w))
        {
            i += 5;
            continue;
        }
        out.push(words[i]);
        i += 1;
    }
    out.join(" ")
}

/// Whether a YAML text holds nothing but blank lines, comments and document markers.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    })
}

pub(crate) fn parse(env: &Env, file: &str, text: &str) -> Result<Parsed, PolicyError> {
    if is_blank(text) {
        return Err(err(
            file,
            None,
            "the file holds no policy: it needs a `rules:` list",
        ));
    }
    let doc: FileDoc = serde_norway::from_str(text).map_err(|e| {
        err(
            file,
            e.location().map(|l| l.line()),
            format!("invalid policy file: {}", yaml_message(&e)),
        )
    })?;
    // `version: 3` and `version: "2025-06"` alike.
    let version = match doc.version {
        None => None,
        Some(serde_norway::Value::String(s)) => Some(s),
        Some(serde_norway::Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            let line = text
                .lines()
                .position(|l| {
                    !l.starts_with(' ') && key_value(l).is_some_and(|(k, _)| k == "version")
                })
                .map(|i| i + 1);
            return Err(err(file, line, "`version` must be a string or a number"));
        }
    };
    let lines = name_lines(text);
    let mut seen: Vec<&str> = Vec::new();
    let mut rules = Vec::with_capacity(doc.rules.len());
    for (i, r) in doc.rules.iter().enumerate() {
        // The k-th rule of this name is on the k-th `name:` line with that value.
        let k = seen.iter().filter(|n| **n == r.name).count();
        seen.push(&r.name);
        let line = lines
            .iter()
            .filter(|(_, v)| *v == r.name)
            .nth(k)
            .map(|(l, _)| *l);
        let next_line = doc.rules.get(i + 1).and_then(|_| {
            // The next rule's name line bounds the search for this rule's fields.
            lines.iter().map(|(l, _)| *l).find(|l| Some(*l) > line)
        });
        rules.push(rule(env, file, text, r, line, next_line)?);
    }
    Ok(Parsed { version, rules })
}

fn rule(
    env: &Env,
    file: &str,
    text: &str,
    r: &RuleDoc,
    line: Option<usize>,
    next: Option<usize>,
) -> Result<Rule, PolicyError> {
    let at = |key: &str| field_line(text, line, next, key).or(line);
    let name = r.name.trim();
    if name.is_empty() {
        return Err(err(file, at("name"), "a rule's `name` is empty"));
    }
    if name.chars().any(char::is_control) {
        return Err(err(
            file,
            at("name"),
            "a rule's `name` has control characters",
        ));
    }
    let tool =
        Glob::new(&r.tool).map_err(|m| err(file, at("tool"), format!("rule `{name}`: {m}")))?;
    let action = match r.action.as_str() {
        "allow" => ToolAction::Allow,
        "deny" => ToolAction::Deny,
        "require_approval" => ToolAction::RequireApproval,
        other => {
            return Err(err(
                file,
                at("action"),
                format!(
                    "rule `{name}`: action `{other}` is not one of allow, deny, require_approval"
                ),
            ))
        }
    };
    let approvers = match (action, &r.approvers) {
        (ToolAction::RequireApproval, None) => {
            return Err(err(
                file,
                line,
                format!("rule `{name}`: require_approval needs `approvers` (a list of groups)"),
            ))
        }
        (ToolAction::RequireApproval, Some(list)) => {
            if list.is_empty() {
                return Err(err(
                    file,
                    at("approvers"),
                    format!("rule `{name}`: `approvers` is empty; require_approval needs at least one group"),
                ));
            }
            let mut out: Vec<String> = Vec::with_capacity(list.len());
            for a in list {
                let a = a.trim();
                if a.is_empty() {
                    return Err(err(
                        file,
                        at("approvers"),
                        format!("rule `{name}`: an approver group is empty"),
                    ));
                }
                if !out.iter().any(|o| o == a) {
                    out.push(a.to_string());
                }
            }
            out
        }
        (_, Some(_)) => {
            return Err(err(
                file,
                at("approvers"),
                format!(
                    "rule `{name}`: `approvers` only goes with require_approval, not {}",
                    action.as_str()
                ),
            ))
        }
        (_, None) => Vec::new(),
    };
    let when = match &r.when {
        None => None,
        Some(None) => {
            return Err(err(
                file,
                at("when"),
                format!(
                "rule `{name}`: `when` has no value; leave it out for a rule that always applies"
            ),
            ))
        }
        Some(Some(src)) => Some(expr::compile(env, src).map_err(|e| {
            let when_line = field_line(text, line, next, "when");
            // A block scalar (`when: |`) starts on the line after the key.
            let base = when_line.map(|l| {
                let value = text
                    .lines()
                    .nth(l - 1)
                    .and_then(|t| t.split_once("when:"))
                    .map(|(_, v)| v.trim())
                    .unwrap_or("");
                if value.starts_with('|') || value.starts_with('>') {
                    l + 1
                } else {
                    l
                }
            });
            // A parse error at the end of the input is on its last line, not after it.
            let last = src.trim_end().lines().count().max(1);
            let line = match (base, e.line) {
                (Some(b), Some(inner)) => Some(b + inner.min(last) - 1),
                (Some(b), None) => Some(b),
                (None, _) => line,
            };
            err(file, line, format!("rule `{name}`: {}", e.message))
        })?),
    };
    Ok(Rule {
        name: name.to_string(),
        description: r.description.clone(),
        tool,
        when,
        action,
        approvers,
        message: r.message.clone(),
        file: file.to_string(),
        line,
    })
}

/// The key of a YAML line (`- name: x` → `name`) and its value, unquoted.
fn key_value(line: &str) -> Option<(&str, &str)> {
    let t = line.trim_start();
    let t = t.strip_prefix("- ").map(str::trim_start).unwrap_or(t);
    let (key, value) = t.split_once(':')?;
    if key.is_empty() || key.contains(char::is_whitespace) {
        return None;
    }
    let mut v = value.trim();
    if let Some(hash) = v.find(" #") {
        if !(v.starts_with('"') || v.starts_with('\'')) {
            v = v[..hash].trim_end();
        }
    }
    let v = if v.len() >= 2
        && ((v.starts_with('"') && v.ends_with('"')) || (v.starts_with('\'') && v.ends_with('\'')))
    {
        &v[1..v.len() - 1]
    } else {
        v
    };
    Some((key, v))
}

/// Every `name: <value>` line, 1-based, with its value.
fn name_lines(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| match key_value(l) {
            Some(("name", v)) => Some((i + 1, v.to_string())),
            _ => None,
        })
        .collect()
}

/// The 1-based line of `key:` in the rule whose name is on `from`, looking down to the next
/// rule's name line.
fn field_line(text: &str, from: Option<usize>, until: Option<usize>, key: &str) -> Option<usize> {
    let from = from?;
    text.lines()
        .enumerate()
        .skip(from - 1)
        .take_while(|(i, _)| until.is_none_or(|u| i + 1 < u))
        .find(|(_, l)| key_value(l).is_some_and(|(k, _)| k == key))
        .map(|(i, _)| i + 1)
}

/// The line to report for a rule of another file's name, or for a duplicate.
pub(crate) fn duplicate_error(first: &Rule, again: &Rule) -> PolicyError {
    let where_first = match first.line {
        Some(l) => format!("{}:{l}", first.file),
        None => first.file.clone(),
    };
    err(
        &again.file,
        again.line,
        format!(
            "rule name `{}` is used twice (first at {where_first}); names are unique across the directory",
            again.name
        ),
    )
}
