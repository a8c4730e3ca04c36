//! Decide: from the hits of the rules that fired to what the caller is told — the message for
//! the verdict's action and, for SANITIZE, the text with the matched spans replaced.

use crate::action::Action;
use crate::rules::CompiledRuleset;
use crate::verdict::Hit;

/// What replaces a sanitized span.
pub const FILTERED: &str = "[FILTERED]";

/// The message for a verdict: each fired rule's message (in the text's language where the rule
/// file has one, else English, else the policy's), most severe first, plus the safe alternatives
/// named by the triggers that hit (RULE-MIST-002's WARN). `triggers`: the distinct triggers
/// that hit (indices into the ruleset's triggers), in the order they were reported.
pub fn message(
    rs: &CompiledRuleset,
    action: Action,
    triggers: &[u32],
    language: Option<&str>,
) -> Option<String> {
    if action == Action::Allow {
        return None;
    }
    let mut rules: Vec<usize> = Vec::new();
    for &t in triggers {
        let t = &rs.triggers[t as usize];
        if t.rule_message && !rules.contains(&t.rule) {
            rules.push(t.rule);
        }
    }
    rules.sort_by_key(|&i| std::cmp::Reverse(rs.rules[i].action));
    let mut parts: Vec<String> = Vec::new();
    for i in rules {
        let r = &rs.rules[i];
        let m = language
            .and_then(|l| r.messages.get(l))
            .or_else(|| r.messages.get("en"))
            .or(r.message.as_ref());
        if let Some(m) = m {
            if !parts.contains(m) {
                parts.push(m.clone());
            }
        }
        for t in triggers.iter().map(|&t| &rs.triggers[t as usize]) {
            if let (true, Some(m)) = (t.rule == i, &t.message) {
                if !parts.contains(m) {
                    parts.push(m.clone());
                }
            }
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join(" "))
    }
}

/// `text` with the span of every SANITIZE hit replaced by [`FILTERED`] (overlapping spans merge).
pub fn sanitize(text: &str, hits: &[Hit]) -> String {
    let mut spans: Vec<(usize, usize)> = hits
        .iter()
        .filter(|h| h.action == Action::Sanitize)
        .map(|h| (h.start as usize, (h.end as usize).min(text.len())))
        .filter(|(s, e)| s < e)
        .collect();
    spans.sort();
    // Widen each span to char boundaries, then merge those that overlap or touch.
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (mut s, mut e) in spans {
        while !text.is_char_boundary(s) {
            s -= 1;
        }
        while !text.is_char_boundary(e) {
            e += 1;
        }
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (s, e) in merged {
        out.push_str(&text[at..s]);
        out.push_str(FILTERED);
        at = e;
    }
    out.push_str(&text[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(start: u64, end: u64, action: Action) -> Hit {
        Hit {
            rule_id: "PII".into(),
            trigger_id: "t".into(),
            language: "neutral",
            start,
            end,
            score: 1.0,
            action,
        }
    }

    #[test]
    fn overlapping_and_touching_spans_are_filtered_once() {
        let text = "card 4111 1111 1111 1111 call +44 20 7946 0958 ok";
        let hits = [
            hit(0, 14, Action::Sanitize),
            hit(5, 24, Action::Sanitize),
            hit(25, 46, Action::Sanitize),
            hit(30, 46, Action::Sanitize),
            hit(47, 49, Action::Flag),
        ];
        assert_eq!(sanitize(text, &hits), "[FILTERED] [FILTERED] ok");
        let touching = [hit(0, 4, Action::Sanitize), hit(4, 9, Action::Sanitize)];
        assert_eq!(
            sanitize(text, &touching),
            "[FILTERED] 1111 1111 1111 call +44 20 7946 0958 ok"
        );
    }

    #[test]
    fn spans_are_widened_to_whole_characters() {
        let text = "née à Zürich";
        // A span that starts and ends inside two-byte characters.
        let hits = [hit(2, 10, Action::Sanitize)];
        assert_eq!(sanitize(text, &hits), "n[FILTERED]rich");
    }
}
