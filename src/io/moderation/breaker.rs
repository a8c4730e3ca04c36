//! The circuit breaker: Closed → Open after `failures` consecutive failed calls; Open fails calls
//! at once for `cooldown`; then HalfOpen lets exactly one probe through: its success closes the
//! breaker, its failure opens it again. Outcomes that say nothing about the API's health (401/403,
//! 429, other 4xx) neither count nor reset.

use super::BreakerState;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
enum Inner {
    Closed { consecutive: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// How a call ended, for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure,
    /// Neither (401/403, 429, 4xx, or the call gave up before an answer for another reason).
    Neutral,
}

pub(crate) struct Breaker {
    failures: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

/// Admission to call; must be finished with [`Permit::finish`] (dropping it counts as neutral).
pub(crate) struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    done: bool,
}

impl Permit {
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.done = true;
        self.breaker.record(self.probe, outcome, Instant::now());
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.breaker
                .record(self.probe, Outcome::Neutral, Instant::now());
        }
    }
}

fn publish(to: BreakerState) {
    metrics::gauge!("mistguard_moderation_breaker_state").set(to as u8 as f64);
    let label = match to {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half_open",
    };
    metrics::counter!("mistguard_moderation_breaker_transitions_total", "to" => label).increment(1);
    let level_warn = to == BreakerState::Open;
    if level_warn {
        tracing::warn!(target: "mistguard::moderation", state = label, "moderation circuit breaker opened");
    } else {
        tracing::info!(target: "mistguard::moderation", state = label, "moderation circuit breaker state");
    }
}

impl Breaker {
    pub(crate) fn new(failures: u32, cooldown: Duration) -> Breaker {
        metrics::gauge!("mistguard_moderation_breaker_state").set(0.0);
        Breaker {
            failures: failures.max(1),
            cooldown,
            inner: Mutex::new(Inner::Closed { consecutive: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state now (an Open breaker past its cooldown reads HalfOpen).
    pub(crate) fn state(&self, now: Instant) -> BreakerState {
        match &*self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if now < *until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// A permit to call, or `None` (fail with BreakerOpen).
    pub(crate) fn admit(self: &Arc<Self>, now: Instant) -> Option<Permit> {
        let mut g = self.lock();
        let probe = match &mut *g {
            Inner::Closed { .. } => false,
            Inner::Open { until } => {
                if now < *until {
                    return None;
                }
                *g = Inner::HalfOpen { probing: true };
                drop(g);
                publish(BreakerState::HalfOpen);
                return Some(Permit {
                    breaker: self.clone(),
                    probe: true,
                    done: false,
                });
            }
            Inner::HalfOpen { probing } => {
                if *probing {
                    return None;
                }
                *probing = true;
                true
            }
        };
        Some(Permit {
            breaker: self.clone(),
            probe,
            done: false,
        })
    }

    fn record(&self, probe: bool, outcome: Outcome, now: Instant) {
        let mut g = self.lock();
        let to = match (&mut *g, outcome) {
            (Inner::Closed { consecutive }, Outcome::Success) => {
                *consecutive = 0;
                None
            }
            (Inner::Closed { consecutive }, Outcome::Failure) => {
                *consecutive += 1;
                (*consecutive >= self.failures).then_some(BreakerState::Open)
            }
            (Inner::HalfOpen { probing }, o) if probe => match o {
                Outcome::Success => Some(BreakerState::Closed),
                Outcome::Failure => Some(BreakerState::Open),
                Outcome::Neutral => {
                    *probing = false;
                    None
                }
            },
            // A call admitted while Closed that ends while Open/HalfOpen: its failure already
            // counts for nothing more.
            _ => None,
        };
        match to {
            Some(BreakerState::Open) => {
                *g = Inner::Open {
                    until: now + self.cooldown,
                }
            }
            Some(BreakerState::Closed) => *g = Inner::Closed { consecutive: 0 },
            _ => {}
        }
        drop(g);
        if let Some(to) = to {
            publish(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_a_probe_closes_it() {
        let b = Arc::new(Breaker::new(3, Duration::from_secs(10)));
        let t0 = Instant::now();
        for _ in 0..2 {
            b.admit(t0).unwrap().finish(Outcome::Failure);
        }
        // A success resets the count; neutral outcomes neither count nor reset.
        b.admit(t0).unwrap().finish(Outcome::Success);
        b.admit(t0).unwrap().finish(Outcome::Failure);
        b.admit(t0).unwrap().finish(Outcome::Neutral);
        b.admit(t0).unwrap().finish(Outcome::Failure);
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.admit(t0).unwrap().finish(Outcome::Failure);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(b.admit(t0 + Duration::from_secs(9)).is_none());
        let later = t0 + Duration::from_secs(11);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        let probe = b.admit(later).unwrap();
        // Exactly one probe.
        assert!(b.admit(later).is_none());
        probe.finish(Outcome::Success);
        assert_eq!(b.state(later), BreakerState::Closed);
        assert!(b.admit(later).is_some());
    }

    #[test]
    fn a_failed_probe_opens_again_and_a_dropped_probe_frees_the_slot() {
        let b = Arc::new(Breaker::new(1, Duration::from_millis(0)));
        let t0 = Instant::now();
        b.admit(t0).unwrap().finish(Outcome::Failure);
        let probe = b.admit(Instant::now()).unwrap();
        assert!(b.admit(Instant::now()).is_none());
        drop(probe);
        let probe = b.admit(Instant::now()).unwrap();
        probe.finish(Outcome::Failure);
        // Open again (cooldown 0: the next admission is a probe again).
        let probe = b.admit(Instant::now()).unwrap();
        assert!(b.admit(Instant::now()).is_none());
        probe.finish(Outcome::Success);
        assert_eq!(b.state(Instant::now()), BreakerState::Closed);
    }
}
