//! RFC 3339 times (UTC, milliseconds) and `15m`-style durations, for the `records` CLI and CSV.
//! The calendar is the `time` crate's (RFC 3339 with offsets, leap years); durations are a
//! sum of `<n><unit>` parts.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// `2026-12-06T10:00:00.123Z` (always UTC, always milliseconds).
pub fn format_rfc3339_ms(unix_ms: u64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Parses an RFC 3339 time (`2026-12-06T10:00:00Z`, fractions and `+02:00` offsets allowed)
/// into Unix milliseconds; `None` for anything else, or a time before 1970.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Parses a duration like `15m`, `2h`, `7d`, `1h30m`, `500ms`, `90s`, `2w` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let mult = match &rest[..unit] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            _ => return None,
        };
        rest = &rest[unit..];
        total = total.checked_add(n.checked_mul(mult)?)?;
    }
    Some(total)
}

/// A `--since`/`--until` value: an RFC 3339 time, or a duration before `now_ms`.
pub fn parse_time_arg(s: &str, now_ms: u64) -> Result<u64, String> {
    if let Some(t) = parse_rfc3339_ms(s) {
        return Ok(t);
    }
    if let Some(d) = parse_duration_ms(s) {
        return Ok(now_ms.saturating_sub(d));
    }
    Err(format!(
        "{s:?}: expected an RFC 3339 time (2026-12-06T10:00:00Z) or a duration ago (15m, 2h, 7d)"
    ))
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        let t = parse_rfc3339_ms("2026-12-06T10:00:00Z").unwrap();
        assert_eq!(t, 1_796_551_200_000);
        assert_eq!(format_rfc3339_ms(t + 123), "2026-12-06T10:00:00.123Z");
        assert_eq!(
            parse_rfc3339_ms("2026-12-06T12:00:00.5+02:00"),
            Some(t + 500)
        );
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            parse_rfc3339_ms("2024-02-29T23:59:59Z")
                .map(format_rfc3339_ms)
                .as_deref(),
            Some("2024-02-29T23:59:59.000Z")
        );
        for bad in [
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-12-06",
            "yesterday",
            "2026-12-06T10:00:00",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("15m"), Some(900_000));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("7d"), Some(604_800_000));
        assert_eq!(parse_duration_ms("10"), None);
        assert_eq!(parse_duration_ms("3y"), None);
        assert_eq!(
            parse_time_arg("2h", 10_000_000).unwrap(),
            10_000_000 - 7_200_000
        );
    }
}
