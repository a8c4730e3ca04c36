//! The [`Moderator`]: cache → budgets → batcher → one API call with keys, client-side limits,
//! retries and the breaker.

use super::breaker::{Breaker, Outcome};
use super::keys::{ApiKey, Keys, Pick};
use super::retry::{backoff, parse_retry_after, unit_random, RetryBudget};
use super::{Answer, BreakerState, ClientConfig, Failure, FailureKind, Request};
use crate::moderation::{
    chat_body, moderations_body, parse_response, Message, ModerationResponse, ParseError,
};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DashMapStateStore;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

const LOG: &str = "mistguard::moderation";
/// Texts waiting for the batcher, at most.
const QUEUE: usize = 4096;

type Direct = governor::DefaultDirectRateLimiter;
type Keyed = governor::RateLimiter<String, DashMapStateStore<String>, DefaultClock>;

/// Estimated tokens of a text: its bytes / 4, rounded up.
pub fn estimated_tokens(text: &str) -> u32 {
    u32::try_from(text.len().div_ceil(4)).unwrap_or(u32::MAX)
}

fn fail(kind: FailureKind, detail: impl Into<String>) -> Failure {
    Failure {
        kind,
        detail: detail.into(),
    }
}

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    Moderations,
    Chat,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Moderations => "/v1/moderations",
            Endpoint::Chat => "/v1/chat/moderations",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Endpoint::Moderations => "moderations",
            Endpoint::Chat => "chat",
        }
    }
}

/// A failed call, with the HTTP status that ended it (the batcher splits on 400/413).
struct CallError {
    failure: Failure,
    status: Option<u16>,
}

impl From<Failure> for CallError {
    fn from(failure: Failure) -> CallError {
        CallError {
            failure,
            status: None,
        }
    }
}

/// How one HTTP attempt ended.
enum Attempt {
    Ok(ModerationResponse),
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    Malformed(ParseError),
    Network,
    Timeout,
}

struct Job {
    text: String,
    key: [u8; 32],
    tx: oneshot::Sender<Result<Answer, Failure>>,
}

struct Shared {
    cfg: ClientConfig,
    base: String,
    http: reqwest::Client,
    keys: Keys,
    breaker: Arc<Breaker>,
    retry_budget: RetryBudget,
    not_before: Mutex<Option<Instant>>,
    rpm: Option<Direct>,
    tpm: Option<Direct>,
    total_budget: Option<Direct>,
    subject_budget: Option<Keyed>,
    budget_checks: AtomicU64,
    cache: Option<quick_cache::sync::Cache<[u8; 32], (Instant, Answer)>>,
    hash_key: [u8; 32],
    batch_limit: AtomicUsize,
}

struct Handle {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Job>,
}

/// The moderation client. Cheap to clone; the batcher task ends when the last clone is dropped.
#[derive(Clone)]
pub struct Moderator {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for Moderator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moderator")
            .field("url", &self.inner.shared.base)
            .field("model", &self.inner.shared.cfg.model)
            .finish_non_exhaustive()
    }
}

fn per_minute(n: u32) -> Option<Direct> {
    NonZeroU32::new(n).map(|n| governor::RateLimiter::direct(governor::Quota::per_minute(n)))
}

fn per_hour(n: u64) -> Option<governor::Quota> {
    NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)).map(governor::Quota::per_hour)
}

/// The cache key: a keyed BLAKE3 hash of model, NUL, text.
pub(crate) fn cache_key(hash_key: &[u8; 32], model: &str, text: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(hash_key);
    h.update(model.as_bytes());
    h.update(b"\0");
    h.update(text.as_bytes());
    *h.finalize().as_bytes()
}

impl Moderator {
    /// Builds the client and spawns its batcher task (call inside a tokio runtime). A missing
    /// key is not an error: calls then fail with [`FailureKind::NoKeys`].
    ///
    /// # Errors
    /// A bad URL (or one holding credentials), an empty model, a batch size of 0, zero
    /// timeouts, a bad retry budget, or no tokio runtime.
    pub fn new(cfg: ClientConfig) -> Result<Moderator, String> {
        let url = reqwest::Url::parse(&cfg.url)
            .map_err(|e| format!("moderation url is not a URL: {e}"))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err("moderation url must be http or https".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("moderation url must not hold credentials".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("moderation url must not have a query or a fragment".into());
        }
        if cfg.model.trim().is_empty() {
            return Err("moderation model is empty".into());
        }
        if cfg.batch_size == 0 {
            return Err("moderation batch size must be at least 1".into());
        }
        if cfg.attempt_timeout.is_zero() || cfg.call_timeout.is_zero() {
            return Err("moderation timeouts must be above zero".into());
        }
        if !cfg.retry_budget.is_finite() || cfg.retry_budget < 0.0 {
            return Err("moderation retry budget must be a number of at least 0".into());
        }
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| "the moderation client must be created inside a tokio runtime")?;
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.attempt_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("mistguard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| "cannot build the moderation HTTP client".to_string())?;
        let mut hash_key = [0u8; 32];
        getrandom::fill(&mut hash_key)
            .map_err(|_| "no randomness for the moderation cache key".to_string())?;
        let base = cfg.url.trim_end_matches('/').to_string();
        metrics::gauge!("mistguard_moderation_batch_limit").set(cfg.batch_size as f64);
        metrics::gauge!("mistguard_moderation_budget_tokens", "scope" => "total")
            .set(cfg.budget_tokens_per_hour as f64);
        metrics::gauge!("mistguard_moderation_budget_tokens", "scope" => "subject")
            .set(cfg.subject_budget_tokens_per_hour as f64);
        metrics::gauge!("mistguard_moderation_auth_outage").set(0.0);
        let shared = Arc::new(Shared {
            base,
            http,
            keys: Keys::new(&cfg.keys, cfg.key_cooldown),
            breaker: Arc::new(Breaker::new(cfg.breaker_failures, cfg.breaker_cooldown)),
            retry_budget: RetryBudget::new(cfg.retry_budget),
            not_before: Mutex::new(None),
            rpm: per_minute(cfg.requests_per_minute),
            tpm: per_minute(cfg.tokens_per_minute),
            total_budget: per_hour(cfg.budget_tokens_per_hour).map(governor::RateLimiter::direct),
            subject_budget: per_hour(cfg.subject_budget_tokens_per_hour)
                .map(governor::RateLimiter::dashmap),
            budget_checks: AtomicU64::new(0),
            cache: (cfg.cache_entries > 0)
                .then(|| quick_cache::sync::Cache::new(cfg.cache_entries)),
            hash_key,
            batch_limit: AtomicUsize::new(cfg.batch_size),
            cfg,
        });
        let (usable, loaded) = shared.keys.counts();
        metrics::gauge!("mistguard_moderation_keys", "state" => "usable").set(usable as f64);
        metrics::gauge!("mistguard_moderation_keys", "state" => "benched")
            .set((loaded - usable) as f64);
        let (tx, rx) = mpsc::channel(QUEUE);
        rt.spawn(batcher(shared.clone(), rx));
        Ok(Moderator {
            inner: Arc::new(Handle { shared, tx }),
        })
    }

    /// Moderates one text through cache → budget checks → batcher. `subject` is an
    /// already-hashed subject id for the per-subject budget.
    ///
    /// # Errors
    /// Every [`FailureKind`]; the failure is counted in `mistguard_moderation_errors_total`.
    pub async fn moderate(&self, text: &str, subject: Option<&str>) -> Result<Answer, Failure> {
        let r = self.moderate_inner(text, subject).await;
        if let Err(f) = &r {
            count_failure(f);
        }
        r
    }

    async fn moderate_inner(&self, text: &str, subject: Option<&str>) -> Result<Answer, Failure> {
        let s = &self.inner.shared;
        let key = cache_key(&s.hash_key, &s.cfg.model, text);
        if let Some(cache) = &s.cache {
            match cache.get(&key) {
                Some((at, ans)) if at.elapsed() < s.cfg.cache_ttl => {
                    metrics::counter!("mistguard_moderation_cache_hits_total").increment(1);
                    return Ok(Answer {
                        cached: true,
                        ..ans
                    });
                }
                Some(_) => {
                    cache.remove(&key);
                    metrics::counter!("mistguard_moderation_cache_misses_total").increment(1);
                }
                None => {
                    metrics::counter!("mistguard_moderation_cache_misses_total").increment(1);
                }
            }
        }
        // What would fail anyway fails before spending the budget.
        s.precheck(Instant::now())?;
        s.check_budgets(estimated_tokens(text), subject)?;
        let (tx, rx) = oneshot::channel();
        let job = Job {
            text: text.to_owned(),
            key,
            tx,
        };
        self.inner.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                fail(FailureKind::ClientLimit, "the moderation queue is full")
            }
            mpsc::error::TrySendError::Closed(_) => {
                fail(FailureKind::Network, "the moderation batcher has stopped")
            }
        })?;
        rx.await
            .unwrap_or_else(|_| Err(fail(FailureKind::Network, "the batch was lost")))
    }

    /// One direct call (for `mistguard moderate`): no cache, no batching, no budget; keys,
    /// retries, the breaker and client-side limits apply.
    ///
    /// # Errors
    /// Every [`FailureKind`] but Budget; an empty request is Rejected.
    pub async fn send(&self, req: Request) -> Result<ModerationResponse, Failure> {
        let s = &self.inner.shared;
        let (ep, body, n, tokens) = match &req {
            Request::Texts(t) => {
                let refs: Vec<&str> = t.iter().map(String::as_str).collect();
                let tokens = t
                    .iter()
                    .fold(0u32, |a, x| a.saturating_add(estimated_tokens(x)));
                (
                    Endpoint::Moderations,
                    moderations_body(&s.cfg.model, &refs),
                    t.len(),
                    tokens,
                )
            }
            Request::Chat(convs) => {
                let msgs: Vec<Vec<Message<'_>>> = convs
                    .iter()
                    .map(|c| {
                        c.iter()
                            .map(|(role, content)| Message { role, content })
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[Message<'_>]> = msgs.iter().map(Vec::as_slice).collect();
                let tokens = convs
                    .iter()
                    .flatten()
                    .fold(0u32, |a, (_, c)| a.saturating_add(estimated_tokens(c)));
                (
                    Endpoint::Chat,
                    chat_body(&s.cfg.model, &refs),
                    convs.len(),
                    tokens,
                )
            }
        };
        let r = if n == 0 {
            Err(fail(FailureKind::Rejected, "nothing to moderate"))
        } else {
            s.call(ep, body, n, tokens).await.map_err(|e| e.failure)
        };
        if let Err(f) = &r {
            count_failure(f);
        }
        r
    }

    /// The circuit breaker's state now.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.shared.breaker.state(Instant::now())
    }

    /// Keys usable now, keys loaded.
    pub fn keys(&self) -> (usize, usize) {
        self.inner.shared.keys.counts()
    }

    /// The batcher's current batch size (halved when a batch is refused with 400/413).
    pub fn batch_limit(&self) -> usize {
        self.inner.shared.batch_limit.load(Ordering::Relaxed)
    }
}

fn count_failure(f: &Failure) {
    metrics::counter!("mistguard_moderation_errors_total", "kind" => f.kind.as_str()).increment(1);
}

async fn batcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let limit = shared.batch_limit.load(Ordering::Relaxed).max(1);
        let mut jobs = vec![first];
        let until = tokio::time::Instant::now() + shared.cfg.batch_window;
        while jobs.len() < limit {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(j)) => jobs.push(j),
                Ok(None) | Err(_) => break,
            }
        }
        tokio::spawn(shared.clone().run_batch(jobs));
    }
}

impl Shared {
    /// Fails at once what would fail without a request: no key, an open breaker, a pending
    /// Retry-After.
    fn precheck(&self, now: Instant) -> Result<(), Failure> {
        if self.keys.counts().1 == 0 {
            return Err(fail(
                FailureKind::NoKeys,
                "no moderation API key configured",
            ));
        }
        if self.breaker.state(now) == BreakerState::Open {
            return Err(fail(
                FailureKind::BreakerOpen,
                "the circuit breaker is open",
            ));
        }
        if let Some(nb) = *self.not_before.lock().unwrap_or_else(|e| e.into_inner()) {
            if now < nb {
                return Err(fail(
                    FailureKind::RateLimited,
                    format!(
                        "the API asked to wait (Retry-After), {} ms left",
                        (nb - now).as_millis()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_budgets(&self, tokens: u32, subject: Option<&str>) -> Result<(), Failure> {
        let n = NonZeroU32::new(tokens.max(1)).unwrap_or(NonZeroU32::MIN);
        if let (Some(lim), Some(subject)) = (&self.subject_budget, subject) {
            if self.budget_checks.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
                lim.retain_recent();
                lim.shrink_to_fit();
            }
            if !matches!(lim.check_key_n(&subject.to_string(), n), Ok(Ok(()))) {
                metrics::counter!("mistguard_moderation_budget_refused_total", "scope" => "subject")
                    .increment(1);
                return Err(fail(
                    FailureKind::Budget,
                    "over the subject's hourly moderation budget",
                ));
            }
        }
        if let Some(lim) = &self.total_budget {
            if !matches!(lim.check_n(n), Ok(Ok(()))) {
                metrics::counter!("mistguard_moderation_budget_refused_total", "scope" => "total")
                    .increment(1);
                return Err(fail(
                    FailureKind::Budget,
                    "over the total hourly moderation budget",
                ));
            }
        }
        Ok(())
    }

    async fn run_batch(self: Arc<Self>, jobs: Vec<Job>) {
        let mut work = vec![jobs];
        while let Some(mut jobs) = work.pop() {
            let texts: Vec<&str> = jobs.iter().map(|j| j.text.as_str()).collect();
            let body = moderations_body(&self.cfg.model, &texts);
            let tokens = texts
                .iter()
                .fold(0u32, |a, t| a.saturating_add(estimated_tokens(t)));
            let n = jobs.len();
            metrics::histogram!("mistguard_moderation_batch_size").record(n as f64);
            match self.call(Endpoint::Moderations, body, n, tokens).await {
                Ok(resp) => {
                    let model: Arc<str> = if resp.model.is_empty() {
                        self.cfg.model.as_str().into()
                    } else {
                        resp.model.into()
                    };
                    let now = Instant::now();
                    for (job, result) in jobs.into_iter().zip(resp.results) {
                        let ans = Answer {
                            model: model.clone(),
                            result,
                            cached: false,
                        };
                        if let Some(c) = &self.cache {
                            c.insert(job.key, (now, ans.clone()));
                        }
                        let _ = job.tx.send(Ok(ans));
                    }
                }
                Err(e) if matches!(e.status, Some(400 | 413)) && n > 1 => {
                    self.shrink_batches(n);
                    let second = jobs.split_off(n / 2);
                    work.push(second);
                    work.push(jobs);
                }
                Err(e) => {
                    for job in jobs {
                        let _ = job.tx.send(Err(e.failure.clone()));
                    }
                }
            }
        }
    }

    /// A batch of `n` texts was refused: the batch size becomes half of the smaller of `n` and
    /// the current size (at least 1).
    fn shrink_batches(&self, n: usize) {
        let mut cur = self.batch_limit.load(Ordering::Relaxed);
        loop {
            let new = (cur.min(n) / 2).max(1);
            if new >= cur {
                return;
            }
            match self
                .batch_limit
                .compare_exchange(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    metrics::gauge!("mistguard_moderation_batch_limit").set(new as f64);
                    tracing::info!(
                        target: LOG,
                        from = cur,
                        to = new,
                        "the moderation API refused a batch (400/413): batch size halved"
                    );
                    return;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Waits for the client-side limit when the wait fits before `deadline`.
    async fn limit_wait(
        lim: &Direct,
        n: u32,
        deadline: Instant,
        what: &str,
    ) -> Result<(), Failure> {
        let n = NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN);
        loop {
            match lim.check_n(n) {
                Ok(Ok(())) => return Ok(()),
                Err(_) => {
                    return Err(fail(
                        FailureKind::ClientLimit,
                        format!("one request is over the client-side {what} per minute"),
                    ))
                }
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    if Instant::now() + wait >= deadline {
                        return Err(fail(
                            FailureKind::ClientLimit,
                            format!("over the client-side {what} per minute"),
                        ));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One HTTP attempt, bounded by `limit`.
    async fn attempt(
        &self,
        ep: Endpoint,
        body: &str,
        n: usize,
        key: &ApiKey,
        limit: Duration,
    ) -> Attempt {
        let started = Instant::now();
        let mut auth = match reqwest::header::HeaderValue::from_str(&key.bearer()) {
            Ok(v) => v,
            // A key with bytes a header cannot hold: the API would refuse it anyway.
            Err(_) => {
                return Attempt::Status {
                    code: 401,
                    retry_after: None,
                }
            }
        };
        auth.set_sensitive(true);
        let req = self
            .http
            .post(format!("{}{}", self.base, ep.path()))
            .header(reqwest::header::AUTHORIZATION, auth)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_owned());
        let run = async {
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if e.is_timeout() => return Attempt::Timeout,
                Err(_) => return Attempt::Network,
            };
            let code = resp.status().as_u16();
            if resp.status().is_success() {
                match resp.bytes().await {
                    Ok(b) => match parse_response(&b, n) {
                        Ok(r) => Attempt::Ok(r),
                        Err(e) => Attempt::Malformed(e),
                    },
                    Err(e) if e.is_timeout() => Attempt::Timeout,
                    Err(_) => Attempt::Network,
                }
            } else {
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                Attempt::Status { code, retry_after }
            }
        };
        let out = tokio::time::timeout(limit, run)
            .await
            .unwrap_or(Attempt::Timeout);
        let status = match &out {
            Attempt::Ok(_) | Attempt::Malformed(_) => "200".to_string(),
            Attempt::Status { code, .. } => code.to_string(),
            Attempt::Network | Attempt::Timeout => "error".to_string(),
        };
        metrics::histogram!("mistguard_moderation_request_seconds", "endpoint" => ep.label())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("mistguard_moderation_requests_total", "endpoint" => ep.label(), "status" => status)
            .increment(1);
        out
    }

    /// One call: keys, client-side limits, attempts and retries, within `call_timeout`.
    async fn call(
        &self,
        ep: Endpoint,
        body: String,
        n: usize,
        tokens: u32,
    ) -> Result<ModerationResponse, CallError> {
        let start = Instant::now();
        let deadline = start + self.cfg.call_timeout;
        self.precheck(start)?;
        let permit = self.breaker.admit(start).ok_or_else(|| {
            CallError::from(fail(
                FailureKind::BreakerOpen,
                "the circuit breaker is open",
            ))
        })?;
        self.retry_budget.record_call(start);
        let r = self.attempts(ep, &body, n, tokens, deadline).await;
        let outcome = match &r {
            Ok(_) => Outcome::Success,
            Err(e) => match e.failure.kind {
                FailureKind::Network
                | FailureKind::Timeout
                | FailureKind::Server
                | FailureKind::Malformed => Outcome::Failure,
                _ => Outcome::Neutral,
            },
        };
        permit.finish(outcome);
        if let Err(e) = &r {
            tracing::debug!(
                target: LOG,
                endpoint = ep.label(),
                kind = e.failure.kind.as_str(),
                status = e.status,
                detail = %e.failure.detail,
                "moderation call failed"
            );
        }
        r
    }

    async fn attempts(
        &self,
        ep: Endpoint,
        body: &str,
        n: usize,
        tokens: u32,
        deadline: Instant,
    ) -> Result<ModerationResponse, CallError> {
        let mut attempt = 0u32;
        let mut refusals = 0usize;
        loop {
            let key = match self.keys.pick() {
                Pick::Key(k) => k,
                Pick::NoKeys => {
                    return Err(
                        fail(FailureKind::NoKeys, "no moderation API key configured").into(),
                    )
                }
                Pick::AllBenched => {
                    return Err(fail(
                        FailureKind::Auth,
                        "every moderation API key was refused (401/403)",
                    )
                    .into())
                }
            };
            if let Some(l) = &self.rpm {
                Self::limit_wait(l, 1, deadline, "requests").await?;
            }
            if let Some(l) = &self.tpm {
                Self::limit_wait(l, tokens, deadline, "tokens").await?;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(fail(FailureKind::Timeout, "the call's time ran out").into());
            }
            let limit = self.cfg.attempt_timeout.min(deadline - now);
            metrics::counter!("mistguard_moderation_tokens_total").increment(u64::from(tokens));
            let (kind, status, retry_after) = match self.attempt(ep, body, n, &key, limit).await {
                Attempt::Ok(r) => {
                    self.keys.accepted();
                    return Ok(r);
                }
                Attempt::Malformed(e) => {
                    self.keys.accepted();
                    let detail = match e {
                        ParseError::WrongLength { .. } => e.to_string(),
                        ParseError::BadScore(_) => "a score in the answer is not in 0..=1".into(),
                        ParseError::Malformed(_) => {
                            "the answer is not JSON of the documented shape".into()
                        }
                    };
                    return Err(CallError {
                        failure: fail(FailureKind::Malformed, detail),
                        status: Some(200),
                    });
                }
                Attempt::Status {
                    code: 401 | 403, ..
                } => {
                    // The same request again at once with the next key (not a retry).
                    self.keys.bench(&key);
                    refusals += 1;
                    if refusals > 1000 {
                        return Err(fail(FailureKind::Auth, "API keys keep being refused").into());
                    }
                    continue;
                }
                Attempt::Status {
                    code: 429,
                    retry_after,
                } => {
                    self.keys.accepted();
                    if let Some(ra) = retry_after {
                        let nb = Instant::now() + ra;
                        let mut g = self.not_before.lock().unwrap_or_else(|e| e.into_inner());
                        if g.is_none_or(|old| old < nb) {
                            *g = Some(nb);
                        }
                    }
                    (FailureKind::RateLimited, Some(429), retry_after)
                }
                Attempt::Status { code, retry_after } if (500..=599).contains(&code) => (
                    FailureKind::Server,
                    Some(code),
                    retry_after.filter(|_| code == 503),
                ),
                Attempt::Status { code, .. } => {
                    self.keys.accepted();
                    return Err(CallError {
                        failure: fail(
                            FailureKind::Rejected,
                            format!("the API refused the request with HTTP {code}"),
                        ),
                        status: Some(code),
                    });
                }
                Attempt::Network => (FailureKind::Network, None, None),
                Attempt::Timeout => (FailureKind::Timeout, None, None),
            };
            let what = match status {
                Some(c) => format!("HTTP {c}"),
                None => kind.as_str().replace('_', " "),
            };
            let give_up = |why: String| CallError {
                failure: fail(kind, format!("{what}; {why}")),
                status,
            };
            if attempt >= self.cfg.retries {
                return Err(give_up(format!("after {} attempt(s)", attempt + 1)));
            }
            let now = Instant::now();
            let wait = match retry_after {
                Some(ra) => {
                    if now + ra >= deadline {
                        return Err(give_up(format!(
                            "Retry-After of {} s is past the call's time left",
                            ra.as_secs()
                        )));
                    }
                    ra
                }
                None => backoff(self.cfg.backoff_base, attempt, unit_random()),
            };
            if now + wait >= deadline {
                return Err(give_up("no time left for a retry".into()));
            }
            if !self.retry_budget.try_retry(now) {
                metrics::counter!("mistguard_moderation_retries_total", "outcome" => "refused")
                    .increment(1);
                return Err(give_up("over the retry budget".into()));
            }
            metrics::counter!("mistguard_moderation_retries_total", "outcome" => "done")
                .increment(1);
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_depend_on_model_text_and_hash_key() {
        let k = [7u8; 32];
        let a = cache_key(&k, "m1", "hello");
        assert_eq!(a, cache_key(&k, "m1", "hello"));
        assert_ne!(a, cache_key(&k, "m2", "hello"));
        assert_ne!(a, cache_key(&k, "m1", "hello!"));
        // The separator keeps ("ab", "c") apart from ("a", "bc").
        assert_ne!(cache_key(&k, "ab", "c"), cache_key(&k, "a", "bc"));
        assert_ne!(a, cache_key(&[8u8; 32], "m1", "hello"));
    }

    #[test]
    fn tokens_are_estimated_from_bytes() {
        assert_eq!(estimated_tokens(""), 0);
        assert_eq!(estimated_tokens("abc"), 1);
        assert_eq!(estimated_tokens("abcd"), 1);
        assert_eq!(estimated_tokens("abcde"), 2);
        assert_eq!(estimated_tokens("é"), 1);
    }

    #[tokio::test]
    async fn bad_settings_are_refused() {
        let ok = ClientConfig::default();
        assert!(Moderator::new(ok.clone()).is_ok());
        for bad in [
            ClientConfig {
                url: "not a url".into(),
                ..ok.clone()
            },
            ClientConfig {
                url: "ftp://example.com".into(),
                ..ok.clone()
            },
            ClientConfig {
                url: "https://user:pw@example.com".into(),
                ..ok.clone()
            },
            ClientConfig {
                batch_size: 0,
                ..ok.clone()
            },
            ClientConfig {
                model: " ".into(),
                ..ok.clone()
            },
            ClientConfig {
                call_timeout: Duration::ZERO,
                ..ok.clone()
            },
            ClientConfig {
                retry_budget: f64::NAN,
                ..ok.clone()
            },
        ] {
            assert!(Moderator::new(bad).is_err());
        }
    }
}
