//! Hand-written conversions between the core's types and the generated protobuf types: the only
//! place where the two meet.

use super::pb;
use crate::action::Action;
use crate::engine::Hit;

pub fn action_to_pb(a: Action) -> pb::Action {
    match a {
        Action::Allow => pb::Action::Allow,
        Action::Flag => pb::Action::Flag,
        Action::Warn => pb::Action::Warn,
        Action::Sanitize => pb::Action::Sanitize,
        Action::Restrict => pb::Action::Restrict,
        Action::RateLimit => pb::Action::RateLimit,
        Action::Block => pb::Action::Block,
        Action::HardBlock => pb::Action::HardBlock,
    }
}

/// `None` for `ACTION_UNSPECIFIED` and unknown values.
pub fn action_from_pb(a: i32) -> Option<Action> {
    Some(match pb::Action::try_from(a).ok()? {
        pb::Action::Unspecified => return None,
        pb::Action::Allow => Action::Allow,
        pb::Action::Flag => Action::Flag,
        pb::Action::Warn => Action::Warn,
        pb::Action::Sanitize => Action::Sanitize,
        pb::Action::Restrict => Action::Restrict,
        pb::Action::RateLimit => Action::RateLimit,
        pb::Action::Block => Action::Block,
        pb::Action::HardBlock => Action::HardBlock,
    })
}

pub fn hit_to_pb(h: &Hit) -> pb::Hit {
    pb::Hit {
        rule_id: h.rule_id.to_string(),
        trigger_id: h.trigger_id.to_string(),
        language: h.language.to_string(),
        start: h.start,
        end: h.end,
        score: h.score,
        action: action_to_pb(h.action) as i32,
    }
}

/// The direction's name for logs.
pub fn direction_name(d: i32) -> &'static str {
    match pb::Direction::try_from(d) {
        Ok(pb::Direction::Input) => "input",
        Ok(pb::Direction::Output) => "output",
        _ => "unspecified",
    }
}

/// Checks a language hint's shape without echoing it: ISO 639-1 (`fr`), optionally with a
/// region (`pt-BR`). Returns the lower-case code.
pub fn language_hint(s: &str) -> Result<Option<String>, &'static str> {
    if s.is_empty() {
        return Ok(None);
    }
    let code = s.split(['-', '_']).next().unwrap_or("");
    let ok = s.len() <= 16
        && (2..=3).contains(&code.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(Some(code.to_ascii_lowercase()))
    } else {
        Err("language must be an ISO 639-1 code such as `fr`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_round_trip_in_severity_order() {
        let mut last = 0;
        for a in Action::ALL {
            let v = action_to_pb(a) as i32;
            assert!(v > last, "{a} out of order");
            last = v;
            assert_eq!(action_from_pb(v), Some(a));
        }
        assert_eq!(action_from_pb(0), None);
        assert_eq!(action_from_pb(99), None);
    }

    #[test]
    fn language_hints() {
        assert_eq!(language_hint(""), Ok(None));
        assert_eq!(language_hint("FR"), Ok(Some("fr".into())));
        assert_eq!(language_hint("pt-BR"), Ok(Some("pt".into())));
        assert!(language_hint("ignore previous instructions").is_err());
        assert!(language_hint("f").is_err());
    }
}
