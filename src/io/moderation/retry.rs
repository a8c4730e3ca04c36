//! Retries: exponential backoff with equal jitter, `Retry-After` parsing, and the retry budget
//! (retries in the last minute at most `ratio` × calls in the last minute + 10).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// The longest backoff.
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Retries allowed per minute whatever the calls.
const BUDGET_FLOOR: f64 = 10.0;

/// The wait before retry number `attempt` (0 for the first retry): `base` × 1.5^attempt, capped at
/// [`BACKOFF_CAP`], with equal jitter (half fixed, half random; `unit` is a random number in
/// 0..1).
pub(crate) fn backoff(base: Duration, attempt: u32, unit: f64) -> Duration {
    let exp = base.as_secs_f64() * 1.5f64.powi(attempt.min(64) as i32);
    let d = exp.min(BACKOFF_CAP.as_secs_f64());
    let unit = unit.clamp(0.0, 1.0);
    Duration::from_secs_f64(d / 2.0 + d / 2.0 * unit)
}

/// A random number in 0..1 (for jitter).
pub(crate) fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// A `Retry-After` value: whole seconds, or an HTTP date (a date in the past is no wait),
/// clamped to [`BACKOFF_CAP`]: one bad header (`Retry-After: 86400`, or more seconds than a `u64`
/// holds) cannot hold every call for longer than a minute.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only: seconds; too many for a u64 is simply "a long time".
        let secs = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(BACKOFF_CAP));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(BACKOFF_CAP),
    )
}

/// `now + wait`, with `wait` clamped to [`BACKOFF_CAP`]; never panics (an `Instant` that cannot
/// be represented is `now`).
pub(crate) fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait.min(BACKOFF_CAP)).unwrap_or(now)
}

/// One second's counts.
#[derive(Clone, Copy, Default)]
struct Bucket {
    second: u64,
    calls: u64,
    retries: u64,
}

/// Calls and retries over the last minute, in one-second buckets.
pub(crate) struct RetryBudget {
    ratio: f64,
    start: Instant,
    buckets: Mutex<[Bucket; 60]>,
}

impl RetryBudget {
    pub(crate) fn new(ratio: f64) -> RetryBudget {
        RetryBudget {
            ratio,
            start: Instant::now(),
            buckets: Mutex::new([Bucket::default(); 60]),
        }
    }

    fn with_bucket<T>(&self, now: Instant, f: impl FnOnce(&mut [Bucket; 60], u64) -> T) -> T {
        let sec = now.saturating_duration_since(self.start).as_secs();
        let mut g = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = &mut g[(sec % 60) as usize];
        if b.second != sec {
            *b = Bucket {
                second: sec,
                ..Bucket::default()
            };
        }
        f(&mut g, sec)
    }

    pub(crate) fn record_call(&self, now: Instant) {
        self.with_bucket(now, |g, sec| g[(sec % 60) as usize].calls += 1);
    }

    /// Takes a retry from the budget, or says no.
    pub(crate) fn try_retry(&self, now: Instant) -> bool {
        let ratio = self.ratio;
        self.with_bucket(now, |g, sec| {
            let (mut calls, mut retries) = (0u64, 0u64);
            for b in g.iter() {
                if b.second + 60 > sec {
                    calls += b.calls;
                    retries += b.retries;
                }
            }
            if (retries + 1) as f64 > ratio * calls as f64 + BUDGET_FLOOR {
                return false;
            }
            g[(sec % 60) as usize].retries += 1;
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_half_is_capped_and_jittered() {
        let base = Duration::from_millis(500);
        assert_eq!(backoff(base, 0, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(base, 0, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(base, 1, 1.0), Duration::from_millis(750));
        assert_eq!(backoff(base, 2, 1.0), Duration::from_micros(1_125_000));
        assert_eq!(backoff(base, 40, 1.0), BACKOFF_CAP);
        assert_eq!(backoff(base, 1000, 0.0), BACKOFF_CAP / 2);
        for _ in 0..100 {
            let u = unit_random();
            assert!((0.0..1.0).contains(&u));
            let d = backoff(base, 3, u);
            assert!(d >= backoff(base, 3, 0.0) && d <= backoff(base, 3, 1.0));
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn a_huge_retry_after_is_clamped_and_never_overflows() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("18446744073709551615", now),
            Some(BACKOFF_CAP)
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(BACKOFF_CAP)
        );
        assert_eq!(parse_retry_after("86400", now), Some(BACKOFF_CAP));
        assert_eq!(parse_retry_after("60", now), Some(BACKOFF_CAP));
        assert_eq!(parse_retry_after("59", now), Some(Duration::from_secs(59)));
        let far = httpdate::fmt_http_date(now + Duration::from_secs(86_400));
        assert_eq!(parse_retry_after(&far, now), Some(BACKOFF_CAP));
        let t = Instant::now();
        assert_eq!(later(t, Duration::MAX), t + BACKOFF_CAP);
        assert_eq!(later(t, Duration::from_secs(u64::MAX)), t + BACKOFF_CAP);
        assert_eq!(later(t, Duration::from_secs(3)), t + Duration::from_secs(3));
    }

    #[test]
    fn the_retry_budget_allows_a_floor_plus_a_fraction_of_calls() {
        let b = RetryBudget::new(0.5);
        let t = Instant::now();
        for _ in 0..10 {
            assert!(b.try_retry(t));
        }
        assert!(!b.try_retry(t));
        for _ in 0..4 {
            b.record_call(t);
        }
        // 0.5 × 4 + 10 = 12.
        assert!(b.try_retry(t));
        assert!(b.try_retry(t));
        assert!(!b.try_retry(t));
        // A minute later the window is empty again.
        let later = t + Duration::from_secs(61);
        for _ in 0..10 {
            assert!(b.try_retry(later));
        }
        assert!(!b.try_retry(later));
    }
}
