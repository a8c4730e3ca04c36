//! Decide: from the hits of the rules that fired to what the caller is told — the message for
//! the verdict's action and, for SANITIZE, the text with the matched spans replaced.

use crate::action::Action;
use crate::rules::{CompiledRuleset, Placeholder, PlaceholderMode};
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
    let filtered = Placeholder {
        mode: PlaceholderMode::Filtered,
        label: "".into(),
    };
    let spans: Vec<(u64, u64, &Placeholder)> = hits
        .iter()
        .filter(|h| h.action == Action::Sanitize)
        .map(|h| (h.start, h.end, &filtered))
        .collect();
    sanitize_spans(text, spans, &[0; 32])
}

/// `text` with each span replaced by its placeholder (see [`render`]). Spans are widened to whole
/// characters; spans that overlap or touch merge, and take the placeholder of the first.
pub fn sanitize_spans(
    text: &str,
    mut spans: Vec<(u64, u64, &Placeholder)>,
    key: &[u8; 32],
) -> String {
    spans.retain(|s| s.0 < s.1 && (s.0 as usize) < text.len());
    spans.sort_by_key(|s| (s.0, s.1));
    // Widen each span to char boundaries, then merge those that overlap or touch.
    let mut merged: Vec<(usize, usize, &Placeholder)> = Vec::with_capacity(spans.len());
    for (s, e, p) in spans {
        let (s, e) = widen(text, s as usize, e as usize);
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e, p)),
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (s, e, p) in merged {
        out.push_str(&text[at..s]);
        render(p, &text[s..e], key, &mut out);
        at = e;
    }
    out.push_str(&text[at..]);
    out
}

/// `[s, e)` widened to the char boundaries of `text` around it (`e` capped at its end).
pub fn widen(text: &str, mut s: usize, e: usize) -> (usize, usize) {
    let mut e = e.min(text.len());
    s = s.min(e);
    while !text.is_char_boundary(s) {
        s -= 1;
    }
    while !text.is_char_boundary(e) {
        e += 1;
    }
    (s, e)
}

/// Appends what replaces `value`: `[FILTERED]`, `[LABEL]`, `[LABEL:<12 hex of a keyed BLAKE3
/// of the value>]`, or nothing.
pub fn render(p: &Placeholder, value: &str, key: &[u8; 32], out: &mut String) {
    match p.mode {
        PlaceholderMode::Filtered => out.push_str(FILTERED),
        PlaceholderMode::Typed => {
            out.push('[');
            out.push_str(&p.label);
            out.push(']');
        }
        PlaceholderMode::Hash => {
            let h = blake3::keyed_hash(key, value.as_bytes());
            out.push('[');
            out.push_str(&p.label);
            out.push(':');
            for b in &h.as_bytes()[..6] {
                out.push(char::from(HEX[(b >> 4) as usize]));
                out.push(char::from(HEX[(b & 15) as usize]));
            }
            out.push(']');
        }
        PlaceholderMode::Remove => {}
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

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
    fn placeholders_render_by_mode() {
        let p = |mode| Placeholder {
            mode,
            label: "EMAIL".into(),
        };
        let text = "mail a@b.org or c@d.org now";
        let key = [7u8; 32];
        let spans = |pl| vec![(5u64, 12u64, pl), (16, 23, pl)];
        let typed = p(PlaceholderMode::Typed);
        assert_eq!(
            sanitize_spans(text, spans(&typed), &key),
            "mail [EMAIL] or [EMAIL] now"
        );
        let removed = p(PlaceholderMode::Remove);
        assert_eq!(sanitize_spans(text, spans(&removed), &key), "mail  or  now");
        let hashed = p(PlaceholderMode::Hash);
        let out = sanitize_spans(text, spans(&hashed), &key);
        // Two values, two hashes of 12 hex digits; the same value hashes alike, another key not.
        let parts: Vec<&str> = out.split(' ').collect();
        assert_eq!(parts[1].len(), "[EMAIL:]".len() + 12, "{out}");
        assert!(
            parts[1].starts_with("[EMAIL:") && parts[1] != parts[3],
            "{out}"
        );
        let again = sanitize_spans("x a@b.org", vec![(2, 9, &hashed)], &key);
        assert_eq!(again, format!("x {}", parts[1]));
        let other = sanitize_spans("x a@b.org", vec![(2, 9, &hashed)], &[8u8; 32]);
        assert_ne!(other, again);
    }

    #[test]
    fn spans_are_widened_to_whole_characters() {
        let text = "née à Zürich";
        // A span that starts and ends inside two-byte characters.
        let hits = [hit(2, 10, Action::Sanitize)];
        assert_eq!(sanitize(text, &hits), "n[FILTERED]rich");
    }
}
