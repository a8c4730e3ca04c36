//! Per-subject limits and budgets (seed 001, cost exploitation): a request rate and a budget of
//! text bytes per window, per direction (prompts, completions). Locally through `governor`'s
//! keyed GCRA limiters; shared across replicas through the Redis backend's GCRA script.
//!
//! A request costs one unit of the request quota and its text's bytes of the byte budget; it is
//! refused (RATE_LIMIT, `rate_limited`, with a retry-after) when either is spent. A stream pays
//! the request at its start and each chunk's bytes as they come.

use super::redis::{RedisBackend, StateError};
use super::{Limited, Quota};
use crate::daemon::config::{QuotaConfig, SubjectLimits};
use crate::daemon::ids::SubjectKey;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DashMapStateStore;
use std::num::NonZeroU32;
use std::time::Duration;

/// Which direction's quotas apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitDir {
    /// Prompts (DIRECTION_INPUT, and calls that name no direction).
    Input,
    /// Completions (DIRECTION_OUTPUT).
    Output,
}

impl LimitDir {
    fn name(self) -> &'static str {
        match self {
            LimitDir::Input => "input",
            LimitDir::Output => "output",
        }
    }
}

type Keyed = governor::RateLimiter<SubjectKey, DashMapStateStore<SubjectKey>, DefaultClock>;

struct One {
    quota: QuotaConfig,
    local: Keyed,
}

impl One {
    fn new(q: QuotaConfig) -> One {
        let amount = NonZeroU32::new(q.amount).unwrap_or(NonZeroU32::MIN);
        let per = (q.period / q.amount.max(1)).max(Duration::from_nanos(1));
        let quota = governor::Quota::with_period(per)
            .unwrap_or_else(|| governor::Quota::per_second(amount))
            .allow_burst(amount);
        One {
            quota: q,
            local: governor::RateLimiter::dashmap(quota),
        }
    }

    /// `None` when `cost` fits now, else how long until it would.
    fn check_local(&self, subject: &SubjectKey, cost: u64) -> Option<Duration> {
        let Some(n) = u32::try_from(cost).ok().and_then(NonZeroU32::new) else {
            return if cost == 0 {
                None
            } else {
                Some(self.quota.period)
            };
        };
        match self.local.check_key_n(subject, n) {
            Ok(Ok(())) => None,
            Ok(Err(not_until)) => Some(not_until.wait_time_from(DefaultClock::default().now())),
            // More than the whole budget at once: never fits.
            Err(_) => Some(self.quota.period),
        }
    }

    fn shared(&self) -> Quota {
        Quota {
            amount: u64::from(self.quota.amount),
            period: self.quota.period,
        }
    }
}

/// The configured quotas: requests and bytes, per direction.
pub struct Limits {
    /// [input requests, input bytes, output requests, output bytes].
    quotas: [Option<One>; 4],
    /// Counted in Redis (it is configured and `limits.scope = shared`).
    backend: Option<RedisBackend>,
    pub closed_when_down: bool,
}

impl Limits {
    /// `backend`: count in Redis (exact across replicas); `None`: per replica.
    pub fn new(c: &SubjectLimits, backend: Option<RedisBackend>) -> Limits {
        Limits {
            quotas: [
                c.input_requests.map(One::new),
                c.input_bytes.map(One::new),
                c.output_requests.map(One::new),
                c.output_bytes.map(One::new),
            ],
            backend,
            closed_when_down: c.closed_when_down,
        }
    }

    /// Whether the limits are counted in Redis.
    pub fn shared(&self) -> bool {
        self.backend.is_some()
    }

    fn pair(&self, dir: LimitDir) -> [(&Option<One>, &'static str); 2] {
        let i = match dir {
            LimitDir::Input => 0,
            LimitDir::Output => 2,
        };
        [(&self.quotas[i], "req"), (&self.quotas[i + 1], "bytes")]
    }

    /// Any quota configured for this direction.
    pub fn any(&self, dir: LimitDir) -> bool {
        self.pair(dir).iter().any(|(q, _)| q.is_some())
    }

    /// Whether a byte budget applies to this direction (streams pay per chunk).
    pub fn has_bytes(&self, dir: LimitDir) -> bool {
        self.pair(dir)[1].0.is_some()
    }

    fn limited(wait: Duration) -> Limited {
        metrics::counter!("mistguard_limited_total", "reason" => "rate_limited").increment(1);
        Limited {
            retry_after: wait.max(Duration::from_millis(1)),
            reason: "rate_limited",
        }
    }

    /// Checks `costs` ([requests, bytes]; see [`Limits::request_costs`], [`Limits::chunk_costs`])
    /// locally. A request refused by the byte budget still used its request unit (it was made).
    pub fn check_local(
        &self,
        subject: &SubjectKey,
        dir: LimitDir,
        costs: [Option<u64>; 2],
    ) -> Option<Limited> {
        let mut wait: Option<Duration> = None;
        for ((q, _), cost) in self.pair(dir).iter().zip(costs) {
            if let (Some(q), Some(cost)) = (q, cost) {
                if let Some(w) = q.check_local(subject, cost) {
                    wait = Some(wait.map_or(w, |x| x.max(w)));
                }
            }
        }
        wait.map(Self::limited)
    }

    /// The same in Redis (exact across replicas).
    pub async fn check_redis(
        &self,
        subject: &SubjectKey,
        dir: LimitDir,
        costs: [Option<u64>; 2],
        now_ms: u64,
    ) -> Result<Option<Limited>, StateError> {
        let Some(backend) = &self.backend else {
            return Ok(self.check_local(subject, dir, costs));
        };
        let hex = subject.hex();
        let mut wait: Option<Duration> = None;
        for ((q, kind), cost) in self.pair(dir).iter().zip(costs) {
            if let (Some(q), Some(cost)) = (q, cost) {
                let key = format!("lim:{}:{kind}:{hex}", dir.name());
                if let Some(w) = backend.limit(&key, q.shared(), cost, now_ms).await? {
                    wait = Some(wait.map_or(w, |x| x.max(w)));
                }
            }
        }
        Ok(wait.map(Self::limited))
    }

    /// Forgets subjects whose local limiters are back to full.
    pub fn sweep(&self) {
        for q in self.quotas.iter().flatten() {
            q.local.retain_recent();
            q.local.shrink_to_fit();
        }
    }

    /// The costs of a whole request of `bytes` (`None`: only the request) or of a later chunk.
    pub fn request_costs(bytes: Option<u64>) -> [Option<u64>; 2] {
        [Some(1), bytes]
    }

    pub fn chunk_costs(bytes: u64) -> [Option<u64>; 2] {
        [None, Some(bytes)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::new(
            &SubjectLimits {
                input_requests: Some(QuotaConfig {
                    amount: 3,
                    period: Duration::from_secs(60),
                }),
                input_bytes: Some(QuotaConfig {
                    amount: 100,
                    period: Duration::from_secs(3600),
                }),
                ..SubjectLimits::default()
            },
            None,
        )
    }

    #[test]
    fn requests_past_the_rate_are_refused_with_a_retry_after() {
        let l = limits();
        let s = SubjectKey([1; 16]);
        for _ in 0..3 {
            assert_eq!(
                l.check_local(&s, LimitDir::Input, Limits::request_costs(None)),
                None
            );
        }
        let r = l
            .check_local(&s, LimitDir::Input, Limits::request_costs(None))
            .expect("limited");
        assert_eq!(r.reason, "rate_limited");
        // About one emission interval (20 s), never more than the period.
        assert!(
            r.retry_after > Duration::from_secs(10) && r.retry_after <= Duration::from_secs(60)
        );
        // Another subject and the other direction are untouched.
        assert_eq!(
            l.check_local(
                &SubjectKey([2; 16]),
                LimitDir::Input,
                Limits::request_costs(None)
            ),
            None
        );
        assert_eq!(
            l.check_local(&s, LimitDir::Output, Limits::request_costs(None)),
            None
        );
        assert!(!l.any(LimitDir::Output));
    }

    #[test]
    fn the_byte_budget_counts_bytes_and_refuses_more_than_the_whole() {
        let l = limits();
        let s = SubjectKey([3; 16]);
        assert_eq!(
            l.check_local(&s, LimitDir::Input, Limits::chunk_costs(60)),
            None
        );
        assert!(l
            .check_local(&s, LimitDir::Input, Limits::chunk_costs(60))
            .is_some());
        assert_eq!(
            l.check_local(&s, LimitDir::Input, Limits::chunk_costs(40)),
            None
        );
        let t = SubjectKey([4; 16]);
        let r = l
            .check_local(&t, LimitDir::Input, Limits::chunk_costs(101))
            .expect("never fits");
        assert_eq!(r.retry_after, Duration::from_secs(3600));
    }
}
