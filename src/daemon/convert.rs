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
        json_path: String::new(),
    }
}

/// The direction's name for logs; `Err` for a value outside the enum (a newer client's, or a
/// wrong one): the caller answers INVALID_ARGUMENT rather than guess.
pub fn direction_name(d: i32) -> Result<&'static str, String> {
    match pb::Direction::try_from(d) {
        Ok(pb::Direction::Unspecified) => Ok("unspecified"),
        Ok(pb::Direction::Input) => Ok("input"),
        Ok(pb::Direction::Output) => Ok("output"),
        Ok(pb::Direction::ToolArguments) => Ok("tool_arguments"),
        Err(_) => Err(format!(
            "direction {d} is not a Direction (0 DIRECTION_UNSPECIFIED, 1 DIRECTION_INPUT, 2 DIRECTION_OUTPUT, 3 DIRECTION_TOOL_ARGUMENTS)"
        )),
    }
}

/// Checks a language hint without echoing it: an ISO 639-1 code the rulesets support (`fr`),
/// optionally with a region (`pt-BR`). Returns the lower-case code. The message of an error
/// lists the supported codes.
pub fn language_hint(s: &str) -> Result<Option<String>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    let code = s.split(['-', '_']).next().unwrap_or("");
    let shaped = s.len() <= 16
        && (2..=3).contains(&code.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let code = code.to_ascii_lowercase();
    if shaped && crate::lang::lang_id(&code).is_some() {
        Ok(Some(code))
    } else {
        Err(format!(
            "language must be one of the supported ISO 639-1 codes (optionally with a region, like pt-BR), or empty to detect it: {}",
            crate::lang::supported_codes()
        ))
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
        // Well formed but not supported: refused, with the list and without the hint.
        let e = language_hint("xx").unwrap_err();
        assert!(e.contains("en fr de"), "{e}");
        assert!(!e.contains("xx"), "{e}");
        assert!(language_hint("tlh").is_err());
    }

    #[test]
    fn directions() {
        assert_eq!(direction_name(0), Ok("unspecified"));
        assert_eq!(direction_name(2), Ok("output"));
        assert!(direction_name(9).is_err());
        assert!(direction_name(-1).is_err());
    }
}
