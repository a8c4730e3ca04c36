//! Tool names in rules: an exact name, or a glob where `*` matches any run of characters
//! (the empty one included) and `?` exactly one.

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Glob {
    /// `*`: every tool.
    Any,
    Exact(String),
    Pattern(Vec<char>),
}

impl Glob {
    pub(crate) fn new(pattern: &str) -> Result<Glob, String> {
        if pattern.is_empty() {
            return Err("`tool` is empty; write `*` for every tool".into());
        }
        if let Some(c) = pattern
            .chars()
            .find(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "`tool` pattern `{}` has {:?}; tool names have no spaces",
                pattern.escape_debug(),
                c
            ));
        }
        if let Some(c) = pattern
            .chars()
            .find(|c| matches!(c, '[' | ']' | '{' | '}' | '!' | '\\'))
        {
            return Err(format!(
                "`tool` pattern `{pattern}` has `{c}`: only `*` and `?` are glob characters"
            ));
        }
        if pattern.chars().all(|c| c == '*') {
            Ok(Glob::Any)
        } else if pattern.contains(['*', '?']) {
            Ok(Glob::Pattern(pattern.chars().collect()))
        } else {
            Ok(Glob::Exact(pattern.to_string()))
        }
    }

    pub(crate) fn exact(&self) -> Option<&str> {
        match self {
            Glob::Exact(s) => Some(s),
            Glob::Any | Glob::Pattern(_) => None,
        }
    }

    pub(crate) fn matches(&self, name: &str) -> bool {
        match self {
            Glob::Any => true,
            Glob::Exact(s) => s == name,
            Glob::Pattern(p) => wildcard(p, name),
        }
    }
}

/// Wildcard matching with one backtrack point (the last `*`), over the name's characters in
/// place (no allocation).
fn wildcard(p: &[char], name: &str) -> bool {
    let (mut pi, mut si) = (0, 0);
    // (pattern index after the star, name byte index the star's run ends at)
    let mut star: Option<(usize, usize)> = None;
    while si < name.len() {
        let c = name[si..].chars().next().unwrap_or_default();
        match p.get(pi) {
            Some('*') => {
                star = Some((pi + 1, si));
                pi += 1;
            }
            Some(&q) if q == '?' || q == c => {
                pi += 1;
                si += c.len_utf8();
            }
            _ => match star {
                Some((after, run_end)) => {
                    // Let the star take one more character.
                    let skip = name[run_end..].chars().next().map_or(1, char::len_utf8);
                    pi = after;
                    si = run_end + skip;
                    star = Some((after, si));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::Glob;

    fn m(p: &str, s: &str) -> bool {
        Glob::new(p).unwrap().matches(s)
    }

    #[test]
    fn stars_and_question_marks() {
        assert!(m("k8s_*", "k8s_delete_pod"));
        assert!(m("k8s_*", "k8s_"));
        assert!(!m("k8s_*", "k8s"));
        assert!(!m("k8s_*", "xk8s_apply"));
        assert!(m("*", ""));
        assert!(m("*_secret", "rotate_secret"));
        assert!(!m("*_secret", "rotate_secrets"));
        assert!(m("a*b*c", "aXXbYYbc"));
        assert!(!m("a*b*c", "aXXbYYb"));
        assert!(m("tool_?", "tool_7"));
        assert!(!m("tool_?", "tool_42"));
        assert!(m("t?ol_*", "tool_42"));
        assert!(m("é?", "éà"));
        assert!(m("execute_sql", "execute_sql"));
        assert!(!m("execute_sql", "execute_sq"));
    }

    #[test]
    fn refused_patterns() {
        assert!(Glob::new("").is_err());
        assert!(Glob::new("k8s_[ab]").is_err());
        assert!(Glob::new("{a,b}").is_err());
        assert!(Glob::new("two words").is_err());
        assert_eq!(Glob::new("sql").unwrap().exact(), Some("sql"));
        assert_eq!(Glob::new("sql*").unwrap().exact(), None);
    }
}

#[cfg(test)]
mod properties {
    use super::Glob;
    use proptest::prelude::*;

    /// The obvious exponential matcher, as the reference.
    fn reference(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => (0..=s.len()).any(|k| reference(rest, &s[k..])),
            Some((&c, rest)) => s
                .split_first()
                .is_some_and(|(&h, tail)| (c == '?' || c == h) && reference(rest, tail)),
        }
    }

    proptest! {
        #[test]
        fn the_matcher_agrees_with_the_reference(p in "[ab*?é]{1,8}", s in "[abé]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let sc: Vec<char> = s.chars().collect();
            prop_assert_eq!(Glob::new(&p).unwrap().matches(&s), reference(&pc, &sc));
        }
    }
}
