//! Per-subject state shared across replicas (issue 18): escalation levels, suspensions, the
//! RULE-MIST-010 rate limit, per-subject request and byte limits, and the Level-2 review queue.
//!
//! The state sits behind one small trait, [`SubjectStore`], with two backends:
//! - `local` (`memory`): the bounded in-memory matrix (`escalation::Escalation`), and with a data
//!   directory the review queue in `data_dir/state.redb` (`disk`), so a restart keeps
//!   suspensions;
//! - `redis`: atomic Lua scripts behind a connection manager, every call bounded by
//!   `redis.timeout`.
//!
//! [`State`] is what the service asks. It always has the local store: without Redis that is
//! the state; with Redis it follows every state Redis reports, and counts on its own only while
//! Redis is unreachable. `limits` holds the per-subject limits and budgets (governor locally,
//! the Redis backend's GCRA script when shared).
//!
//! Invariants:
//! - **Never longer than the timeout.** A request waits for Redis at most `redis.timeout`; then
//!   local state answers, the daemon is marked degraded (`mistguard_state_degraded` 1, one WARN
//!   line) and a background task probes Redis until it answers again.
//! - **Nothing de-escalates because Redis is unreachable.** Every suspension and rate limit Redis
//!   reports is kept locally, so an outage lifts none; those made during an outage are kept and
//!   written to Redis when it is back ([`State::maintain`]), never shortening one there, before
//!   the daemon stops being degraded and asks Redis again.
//! - **Exact across replicas.** With Redis healthy, counting happens only in Redis's scripts.
//! - Only hashes, rule ids and decision ids are stored; never text or a raw subject.

pub mod disk;
pub mod limits;
pub mod local;
pub mod redis;

pub use self::redis::StateError;

use super::config::{EscalationConfig, RedisConfig, SubjectLimits};
use super::escalation::Gate;
use super::ids::SubjectKey;
use crate::action::Action;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The per-subject state behind one small trait, with two backends: `memory`
/// ([`local::LocalStore`]: the bounded map, plus the review queue on disk with a data
/// directory) and `redis` ([`redis::RedisBackend`]: atomic scripts, exact across replicas).
/// Subjects are keyed hashes (32 hex digits); times are the caller's, in ms since the epoch.
#[tonic::async_trait]
pub trait SubjectStore: Send + Sync {
    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StateError>;
    /// The subject's suspension, rate limit and level-1 mark.
    async fn check(&self, subject: &str, now_ms: u64) -> Result<SubjectGate, StateError>;
    /// Counts a decision with hits; suspends at `level2_hits` (exactly once), raises level 3.
    async fn record(
        &self,
        p: &EscalationParams,
        v: &Violation<'_>,
    ) -> Result<RecordOutcome, StateError>;
    /// Takes a suspension made elsewhere (an outage's, the disk's), never shortening one.
    async fn merge_suspension(
        &self,
        p: &EscalationParams,
        entry: &ReviewEntry,
        now_ms: u64,
    ) -> Result<(), StateError>;
    /// Takes a RULE-MIST-010 rate limit made elsewhere, never shortening one.
    async fn merge_rate_limit(
        &self,
        subject: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<(), StateError>;
    /// The Level-2 review queue, oldest first.
    async fn reviews(&self, limit: usize, now_ms: u64) -> Result<Vec<ReviewEntry>, StateError>;
    /// Lifts a suspension (and its review entry): whether there was one.
    async fn lift(&self, subject: &str, now_ms: u64) -> Result<bool, StateError>;
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EscalationParams {
    pub fn from_config(c: &EscalationConfig) -> EscalationParams {
        let ms = |d: Duration| d.as_millis().min(u128::from(u64::MAX)) as u64;
        EscalationParams {
            level2_hits: c.level2_hits,
            level2_window_ms: ms(c.level2_window),
            suspension_ms: ms(c.suspension),
            rate_limit_ms: ms(c.rate_limit),
            level3_subjects: c.level3_subjects,
            level3_window_ms: ms(c.level3_window),
        }
    }
}

/// What an outage left to write to the shared store once it is back, for one subject: its
/// suspension (with the review entry) and its latest rate limit.
#[derive(Default)]
struct Pending {
    suspension: Option<ReviewEntry>,
    rate_limited_until: Option<u64>,
}

/// Most subjects an outage keeps for the merge. Past it a new rate limit is not kept (counted in
/// `mistguard_state_merge_dropped_total`; the local state still holds it), and a new suspension
/// takes the place of a subject that has only a rate limit.
const MAX_PENDING: usize = 100_000;

/// The shared store (Redis) and what the daemon knows of its health.
struct Shared {
    store: Arc<dyn SubjectStore>,
    degraded: AtomicBool,
    /// By subject hash.
    pending: Mutex<std::collections::HashMap<String, Pending>>,
}

/// The per-subject state of the daemon (see the module documentation).
pub struct State {
    /// Always there: the state without Redis, the fallback (and the mirror) with it.
    pub local: local::LocalStore,
    params: EscalationParams,
    shared: Option<Shared>,
    pub limits: limits::Limits,
}

/// Why a per-subject limit stopped a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
    /// `rate_limited`, or `limits_unavailable` (Redis down, `limits.when_redis_down = closed`).
    pub reason: &'static str,
}

impl State {
    /// This daemon's recent level-3 alerts (the review console's list).
    pub fn alerts(&self) -> super::escalation::Alerts {
        self.local.esc.alerts.clone()
    }

    /// # Errors
    /// A bad Redis URL, or a state file that does not open (one line).
    pub fn new(
        esc: EscalationConfig,
        data_dir: Option<&std::path::Path>,
        redis_cfg: &RedisConfig,
        limits_cfg: &SubjectLimits,
    ) -> Result<State, String> {
        let params = EscalationParams::from_config(&esc);
        let local = local::LocalStore::open(esc, data_dir, now_ms())?;
        let backend = match &redis_cfg.url {
            Some(url) => Some(redis::RedisBackend::new(
                url,
                redis_cfg.timeout,
                &redis_cfg.prefix,
            )?),
            None => None,
        };
        let limits = limits::Limits::new(limits_cfg, backend.clone().filter(|_| limits_cfg.shared));
        let state = State {
            local,
            params,
            shared: backend.map(|b| Shared {
                store: Arc::new(b),
                degraded: AtomicBool::new(false),
                pending: Mutex::new(std::collections::HashMap::new()),
            }),
            limits,
        };
        // Suspensions restored from the data directory may have been made during an outage
        // before a restart: they go to Redis before Redis is asked (degraded until merged).
        if let Some(r) = &state.shared {
            let restored = state.local.esc.reviews(MAX_PENDING, now_ms());
            if !restored.is_empty() {
                r.degraded.store(true, Ordering::Release);
                for e in restored {
                    state.keep_suspension(r, e);
                }
            }
        }
        Ok(state)
    }

    pub fn has_redis(&self) -> bool {
        self.shared.is_some()
    }

    /// How long a subject that reaches level 2 is suspended.
    pub fn suspension(&self) -> Duration {
        Duration::from_millis(self.params.suspension_ms)
    }

    /// Checks Redis once (start-up): `Err` when it does not answer. Unless `required` (the
    /// caller then stops, saying so in one line), the daemon is degraded until Redis answers,
    /// and one WARN line says so.
    pub async fn probe(&self, required: bool) -> Result<(), String> {
        let Some(r) = &self.shared else { return Ok(()) };
        metrics::gauge!("mistguard_state_degraded").set(0.0);
        r.store.ping().await.map_err(|e| {
            if !required {
                self.went_down(r, "start", &e);
            }
            e.to_string()
        })
    }

    /// Drops expired local state (every minute).
    pub fn sweep(&self, now: u64) {
        self.local.esc.sweep(now);
        self.limits.sweep();
    }

    /// The shared store, unless it is not configured or known to be down (then local state
    /// answers at once, and [`State::maintain`] probes it in the background).
    fn live(&self) -> Option<&Shared> {
        self.shared
            .as_ref()
            .filter(|r| !r.degraded.load(Ordering::Acquire))
    }

    fn went_down(&self, r: &Shared, op: &str, e: &StateError) {
        if !r.degraded.swap(true, Ordering::AcqRel) {
            metrics::gauge!("mistguard_state_degraded").set(1.0);
            tracing::warn!(
                target: "mistguard::state",
                op,
                error = %e,
                "shared state degraded: Redis is unreachable; answering from local state and reconnecting"
            );
        }
    }

    fn pending_lock<'a>(
        &self,
        r: &'a Shared,
    ) -> std::sync::MutexGuard<'a, std::collections::HashMap<String, Pending>> {
        r.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a suspension made locally for the merge.
    fn keep_suspension(&self, r: &Shared, e: ReviewEntry) {
        let mut q = self.pending_lock(r);
        if !q.contains_key(&e.subject) && q.len() >= MAX_PENDING {
            // Make room from a subject that only has a rate limit.
            let victim = q
                .iter()
                .find(|(_, p)| p.suspension.is_none())
                .map(|(k, _)| k.clone());
            metrics::counter!("mistguard_state_merge_dropped_total").increment(1);
            match victim {
                Some(k) => {
                    q.remove(&k);
                }
                None => return,
            }
        }
        let p = q.entry(e.subject.clone()).or_default();
        if p.suspension
            .as_ref()
            .is_none_or(|old| old.until_unix_ms < e.until_unix_ms)
        {
            p.suspension = Some(e);
        }
    }

    /// Keeps a rate limit made locally for the merge (the latest per subject).
    fn keep_rate_limit(&self, r: &Shared, subject: String, until_ms: u64) {
        let mut q = self.pending_lock(r);
        if !q.contains_key(&subject) && q.len() >= MAX_PENDING {
            metrics::counter!("mistguard_state_merge_dropped_total").increment(1);
            return;
        }
        let p = q.entry(subject).or_default();
        p.rate_limited_until = Some(p.rate_limited_until.unwrap_or(0).max(until_ms));
    }

    /// The subject's gate: Redis's state when it answers within the timeout (the local copy
    /// then follows it), else the local state.
    pub async fn gate(&self, subject: &SubjectKey, now: u64) -> Gate {
        let local = self.local.esc.state(subject, now);
        let Some(r) = self.live() else {
            return Gate::from_state(&local);
        };
        match r.store.check(&subject.hex(), now).await {
            // Redis answers: it is the state (suspensions made during an outage were merged
            // into it before the daemon stopped being degraded; one lifted on another replica
            // is lifted here). The local copy follows it, for the next outage.
            Ok(remote) => {
                self.local.follow(subject, &remote, now).await;
                Gate::from_state(&remote)
            }
            Err(e) => {
                self.went_down(r, "check", &e);
                Gate::from_state(&local)
            }
        }
    }

    /// Records a decision with hits about the subject: Redis's script counts it (exact across
    /// replicas), or, without Redis or while it is unreachable, the local matrix does.
    pub async fn record(
        &self,
        subject: &SubjectKey,
        decision_id: &str,
        action: Action,
        rules: &[&str],
        now: u64,
    ) -> RecordOutcome {
        if rules.is_empty() {
            return RecordOutcome {
                level: self.local.esc.level_of(subject, now),
                ..RecordOutcome::default()
            };
        }
        let hex = subject.hex();
        let v = Violation {
            subject: &hex,
            decision_id,
            severe: action >= Action::Block,
            rules,
            now_ms: now,
        };
        if let Some(r) = self.live() {
            match r.store.record(&self.params, &v).await {
                Ok(o) => {
                    let mut mirror = SubjectGate::default();
                    if o.suspended_now {
                        metrics::counter!("mistguard_escalation_level2_total").increment(1);
                        mirror.suspended_until_ms =
                            Some(now.saturating_add(self.params.suspension_ms));
                    }
                    if o.alert {
                        self.local.esc.alerts.raise(
                            "level2_subjects",
                            self.params.level3_subjects as usize,
                            Duration::from_millis(self.params.level3_window_ms),
                        );
                    }
                    if rules.contains(&"RULE-MIST-010") && self.params.rate_limit_ms > 0 {
                        mirror.rate_limited_until_ms =
                            Some(now.saturating_add(self.params.rate_limit_ms));
                    }
                    self.local.esc.mirror(subject, &mirror, now);
                    return o;
                }
                Err(e) => self.went_down(r, "record", &e),
            }
        }
        // The local store never fails.
        let outcome = self
            .local
            .record(&self.params, &v)
            .await
            .unwrap_or_default();
        if let Some(r) = &self.shared {
            if outcome.suspended_now {
                if let Some(e) = self.local.esc.review(&hex) {
                    self.keep_suspension(r, e);
                }
            }
            if rules.contains(&"RULE-MIST-010") {
                if let Some(until_ms) = self.local.esc.state(subject, now).rate_limited_until_ms {
                    self.keep_rate_limit(r, hex, until_ms);
                }
            }
        }
        outcome
    }

    /// The Level-2 review queue, oldest first (from Redis when configured and answering).
    pub async fn reviews(&self, limit: usize, now: u64) -> Vec<ReviewEntry> {
        if let Some(r) = self.live() {
            match r.store.reviews(limit, now).await {
                Ok(list) => return list,
                Err(e) => self.went_down(r, "reviews", &e),
            }
        }
        self.local.reviews(limit, now).await.unwrap_or_default()
    }

    /// Lifts a suspension everywhere it is kept. `Err` when Redis does not answer (the local
    /// lift is done; the caller should retry so the replicas see it).
    pub async fn lift(&self, subject_hex: &str, now: u64) -> Result<bool, String> {
        let mut lifted = self.local.lift(subject_hex, now).await.unwrap_or(false);
        if let Some(r) = &self.shared {
            self.pending_lock(r).remove(subject_hex);
            match r.store.lift(subject_hex, now).await {
                Ok(l) => lifted |= l,
                Err(e) => {
                    self.went_down(r, "lift", &e);
                    return Err(format!(
                        "Redis did not answer ({e}); lifted on this replica only"
                    ));
                }
            }
        }
        Ok(lifted)
    }

    /// A per-subject limit or budget: `Some` when the request must be refused.
    ///
    /// `costs` are [requests, bytes] (see `limits::Limits::request_costs` and `chunk_costs`).
    pub async fn limit(
        &self,
        subject: &SubjectKey,
        dir: limits::LimitDir,
        costs: [Option<u64>; 2],
        now: u64,
    ) -> Option<Limited> {
        if !self.limits.any(dir) {
            return None;
        }
        if let (Some(r), true) = (&self.shared, self.limits.shared()) {
            if r.degraded.load(Ordering::Acquire) {
                return self.limits_down(subject, dir, costs);
            }
            match self.limits.check_redis(subject, dir, costs, now).await {
                Ok(l) => return l,
                Err(e) => {
                    self.went_down(r, "limit", &e);
                    return self.limits_down(subject, dir, costs);
                }
            }
        }
        self.limits.check_local(subject, dir, costs)
    }

    /// The limits while Redis is down: per replica, or refused (`limits.when_redis_down`).
    fn limits_down(
        &self,
        subject: &SubjectKey,
        dir: limits::LimitDir,
        costs: [Option<u64>; 2],
    ) -> Option<Limited> {
        if self.limits.closed_when_down {
            metrics::counter!("mistguard_limited_total", "reason" => "limits_unavailable")
                .increment(1);
            return Some(Limited {
                retry_after: Duration::from_secs(1),
                reason: "limits_unavailable",
            });
        }
        self.limits.check_local(subject, dir, costs)
    }

    /// Periodic upkeep (every second): while degraded, probes Redis; once it answers (and
    /// whenever changes are waiting), writes what the outage left (suspensions and rate limits,
    /// never shortening one; not those lifted since) and clears the degraded mark.
    pub async fn maintain(&self, now: u64) {
        let Some(r) = &self.shared else { return };
        let degraded = r.degraded.load(Ordering::Acquire);
        if !degraded && self.pending_lock(r).is_empty() {
            return;
        }
        if r.store.ping().await.is_err() {
            return;
        }
        let pending = std::mem::take(&mut *self.pending_lock(r));
        let total = pending.len();
        let mut left = Vec::new();
        for (subject, p) in pending {
            // Lifted since it was kept: the local state no longer holds it.
            let held = SubjectKey::from_hex(&subject)
                .map(|k| self.local.esc.state(&k, now))
                .unwrap_or_default();
            let mut res = Ok(());
            if let (Some(e), Some(_)) = (&p.suspension, held.suspended_until_ms) {
                if e.until_unix_ms > now {
                    res = r.store.merge_suspension(&self.params, e, now).await;
                }
            }
            if let (Some(until), Some(_), true) = (
                p.rate_limited_until,
                held.rate_limited_until_ms,
                res.is_ok(),
            ) {
                if until > now {
                    res = r.store.merge_rate_limit(&subject, until, now).await;
                }
            }
            if res.is_err() {
                left.push((subject, p));
            }
        }
        let mut q = self.pending_lock(r);
        if left.is_empty() && q.is_empty() {
            // Under the lock: a change kept from now on finds the daemon live (so it went to
            // Redis), or is merged on the next tick.
            if degraded {
                r.degraded.store(false, Ordering::Release);
                metrics::gauge!("mistguard_state_degraded").set(0.0);
                tracing::info!(
                    target: "mistguard::state",
                    merged = total,
                    "shared state recovered: Redis answers again; local changes merged"
                );
            }
        } else {
            for (k, p) in left {
                q.entry(k).or_insert(p);
            }
        }
    }
}

/// The escalation parameters a backend applies (from `EscalationConfig`), in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EscalationParams {
    pub level2_hits: u32,
    pub level2_window_ms: u64,
    pub suspension_ms: u64,
    /// How long a RULE-MIST-010 hit rate-limits its subject (0: not at all).
    pub rate_limit_ms: u64,
    pub level3_subjects: u32,
    pub level3_window_ms: u64,
}

/// One decision with at least one hit, about one subject.
#[derive(Clone, Debug)]
pub struct Violation<'a> {
    /// The subject's keyed hash, 32 lower-case hex digits.
    pub subject: &'a str,
    /// The decision's id (kept with the severe decisions, so a review entry links its records).
    pub decision_id: &'a str,
    /// The decision was BLOCK or above.
    pub severe: bool,
    /// The distinct rule ids that fired.
    pub rules: &'a [&'a str],
    /// Milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// A subject's state before its text is looked at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubjectGate {
    /// Suspended until this instant (ms since the epoch), if suspended now.
    pub suspended_until_ms: Option<u64>,
    /// Rate-limited (RULE-MIST-010) until this instant, if so now.
    pub rate_limited_until_ms: Option<u64>,
    /// The subject had a hit within the level-2 window (escalation level 1).
    pub any_hit: bool,
}

/// What recording a violation changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordOutcome {
    /// The subject's level after the decision: 1, 2 (suspended), or 3 (this decision raised the
    /// level-3 alert).
    pub level: u32,
    /// This decision suspended the subject (exactly one decision does, across replicas).
    pub suspended_now: bool,
    /// This decision raised the level-3 alert (once per `level3_window`, across replicas).
    pub alert: bool,
    /// Severe decisions counted in the window after this one (0 once suspended).
    pub severe_count: u32,
}

/// One entry of the Level-2 review queue.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReviewEntry {
    /// The subject's keyed hash (32 hex digits).
    pub subject: String,
    /// The rules that put it there, with how many decisions in the window each fired in.
    pub rules: Vec<(String, u32)>,
    /// When it was suspended, and until when (ms since the epoch).
    pub suspended_unix_ms: u64,
    pub until_unix_ms: u64,
    /// The decision ids of the severe decisions that suspended it (its records).
    pub record_ids: Vec<String>,
}

/// A per-subject limit: `amount` units (requests, or input bytes) per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub amount: u64,
    pub period: Duration,
}

/// A limit's answer: `None` when within it, else how long until the request would fit.
pub type RetryAfter = Option<Duration>;
