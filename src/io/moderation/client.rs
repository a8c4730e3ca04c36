//! The [`Moderator`]: cache → budgets → batcher → one API call with keys, client-side limits,
//! retries and the breaker.

use super::breaker::{Breaker, Outcome};
use super::keys::{look, ApiKey, Keys, Pick};
use super::retry::{backoff, later, parse_retry_after, unit_random, RetryBudget};
use super::{Answer, BreakerState, ClientConfig, Failure, FailureKind, Request};
use crate::moderation::{
    chat_body, moderations_body, parse_response, Message, ModerationResponse, ParseError,
};
use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

const LOG: &str = "mistguard::moderation";
/// Texts waiting for the batcher, at most.
const QUEUE: usize = 4096;
/// Distinct subjects the per-subject budget tracks, at most (see [`Shared::check_budgets`]).
const SUBJECTS_CAP: usize = 100_000;
/// How often the background task sweeps subjects whose budget is whole again out of the map.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How often the background task looks at the key file.
const KEY_FILE_EVERY: Duration = Duration::from_secs(1);
/// Consecutive successful batches after which a halved batch size doubles again.
const GROW_AFTER: u32 = 64;

type Direct = governor::DefaultDirectRateLimiter;
type Keyed = governor::RateLimiter<String, Subjects, DefaultClock>;

/// The per-subject budget's state store: governor's DashMap, shared with the client so that it
/// can ask how many subjects are tracked and whether one is.
#[derive(Clone, Default)]
struct Subjects(Arc<DashMapStateStore<String>>);

impl StateStore for Subjects {
    type Key = String;
    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<String> for Subjects {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below);
    }
    fn shrink_to_fit(&self) {
        self.0.shrink_to_fit();
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The per-subject budget: the limiter and its map, capped at `cap` subjects.
struct SubjectBudget {
    limiter: Keyed,
    subjects: Subjects,
    cap: usize,
}

impl SubjectBudget {
    fn new(quota: governor::Quota, cap: usize) -> SubjectBudget {
        let subjects = Subjects::default();
        SubjectBudget {
            limiter: governor::RateLimiter::new(quota, subjects.clone(), DefaultClock::default()),
            subjects,
            cap,
        }
    }

    /// `Some(within the budget)`; `None` when the subject is not tracked and the map is full
    /// (the subject's budget is then not checked).
    fn check(&self, subject: &str, n: NonZeroU32) -> Option<bool> {
        let map = &self.subjects.0;
        if map.len() >= self.cap && !map.contains_key(subject) {
            return None;
        }
        Some(matches!(
            self.limiter.check_key_n(&subject.to_string(), n),
            Ok(Ok(()))
        ))
    }

    /// Drops the subjects whose budget is whole again.
    fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

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
    subject_budget: Option<SubjectBudget>,
    cache: Option<quick_cache::sync::Cache<[u8; 32], (Instant, Answer)>>,
    hash_key: [u8; 32],
    batch_limit: AtomicUsize,
    /// Successful batches in a row at the current batch limit (below `batch_size`).
    batch_streak: Mutex<u32>,
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
    /// Builds the client and spawns its batcher task and its background task (call inside a
    /// tokio runtime): every second it looks at the key file (off the async threads) and swaps
    /// the keys read in; every 10 s it drops the subjects whose budget is whole again. Both tasks
    /// end once the client is dropped. A missing key is not an error: calls then fail with
    /// [`FailureKind::NoKeys`]. The key file is read once here, synchronously.
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
                .map(|q| SubjectBudget::new(q, SUBJECTS_CAP)),
            cache: (cfg.cache_entries > 0)
                .then(|| quick_cache::sync::Cache::new(cfg.cache_entries)),
            hash_key,
            batch_limit: AtomicUsize::new(cfg.batch_size),
            batch_streak: Mutex::new(0),
            cfg,
        });
        let (usable, loaded) = shared.keys.counts();
        metrics::gauge!("mistguard_moderation_keys", "state" => "usable").set(usable as f64);
        metrics::gauge!("mistguard_moderation_keys", "state" => "benched")
            .set(loaded.saturating_sub(usable) as f64);
        let (tx, rx) = mpsc::channel(QUEUE);
        rt.spawn(batcher(shared.clone(), rx));
        rt.spawn(maintain(Arc::downgrade(&shared)));
        Ok(Moderator {
            inner: Arc::new(Handle { shared, tx }),
        })
    }

    /// Moderates one text through cache → budget checks → batcher. `subject` is an
    /// already-hashed subject id for the per-subject budget.
    ///
    /// # Errors
    /// Every [`FailureKind`]; the failure is counted in `mistguard_moderation_errors_total`. An
    /// empty text is [`FailureKind::Rejected`] at once, without a request.
    pub async fn moderate(&self, text: &str, subject: Option<&str>) -> Result<Answer, Failure> {
        let r = self.moderate_inner(text, subject).await;
        if let Err(f) = &r {
            count_failure(f);
        }
        r
    }

    async fn moderate_inner(&self, text: &str, subject: Option<&str>) -> Result<Answer, Failure> {
        if text.is_empty() {
            return Err(fail(FailureKind::Rejected, "empty text"));
        }
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

    /// The batcher's current batch size (halved when a batch is refused with 400/413, doubled
    /// again, up to `batch_size`, after 64 successful batches in a row).
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

/// The client's background task: looks at the key file every second (the request path only
/// reads the keys in memory) and sweeps the per-subject budget's map every 10 s. It holds the
/// client weakly and ends once the client is gone.
async fn maintain(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(KEY_FILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_sweep = Instant::now();
    loop {
        tick.tick().await;
        let file = {
            let Some(s) = shared.upgrade() else { return };
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                if let Some(b) = &s.subject_budget {
                    b.sweep();
                }
            }
            s.keys.file()
        };
        if let Some((path, stamp)) = file {
            let Ok(found) = tokio::task::spawn_blocking(move || look(&path, stamp)).await else {
                continue;
            };
            let Some(s) = shared.upgrade() else { return };
            s.keys.apply(found);
        }
    }
}

/// A batch refusal worth splitting: a 4xx that is about the request (not 401/403/429).
fn splittable(e: &CallError) -> bool {
    e.failure.kind == FailureKind::Rejected
        && matches!(e.status, Some(c) if (400..=499).contains(&c) && !matches!(c, 401 | 403 | 429))
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

    /// The subject's budget, then the total. The subjects tracked are bounded: at most
    /// [`SUBJECTS_CAP`] (100 000) at once (the background task drops those whose budget is whole
    /// again every 10 s); while the map is full, a subject not in it is checked against the total
    /// budget only.
    fn check_budgets(&self, tokens: u32, subject: Option<&str>) -> Result<(), Failure> {
        let n = NonZeroU32::new(tokens.max(1)).unwrap_or(NonZeroU32::MIN);
        if let (Some(lim), Some(subject)) = (&self.subject_budget, subject) {
            if lim.check(subject, n) == Some(false) {
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

    /// Sends a batch and answers its callers. A batch of more than one text is split in two
    /// halves, each sent again (and split again as needed), when the API refuses it with a 4xx
    /// other than 401/403/429 (only the offending text then fails, Rejected), or when its
    /// estimated tokens are over the client-side tokens per minute (it could never go out whole).
    /// A 400 or 413 also halves the batch size (once per batch the batcher formed).
    async fn run_batch(self: Arc<Self>, jobs: Vec<Job>) {
        let mut work = vec![jobs];
        let mut shrunk = false;
        while let Some(mut jobs) = work.pop() {
            let n = jobs.len();
            let tokens = jobs
                .iter()
                .fold(0u32, |a, j| a.saturating_add(estimated_tokens(&j.text)));
            let tpm = self.cfg.tokens_per_minute;
            if n > 1 && tpm > 0 && tokens > tpm {
                let second = jobs.split_off(n / 2);
                work.push(second);
                work.push(jobs);
                continue;
            }
            let texts: Vec<&str> = jobs.iter().map(|j| j.text.as_str()).collect();
            let body = moderations_body(&self.cfg.model, &texts);
            metrics::histogram!("mistguard_moderation_batch_size").record(n as f64);
            match self.call(Endpoint::Moderations, body, n, tokens).await {
                Ok(resp) => {
                    self.batch_succeeded();
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
                Err(e) if n > 1 && splittable(&e) => {
                    if matches!(e.status, Some(400 | 413)) && !shrunk {
                        shrunk = true;
                        self.shrink_batches(n);
                    } else {
                        self.batch_failed();
                    }
                    let second = jobs.split_off(n / 2);
                    work.push(second);
                    work.push(jobs);
                }
                Err(e) => {
                    self.batch_failed();
                    for job in jobs {
                        let _ = job.tx.send(Err(e.failure.clone()));
                    }
                }
            }
        }
    }

    fn streak(&self) -> std::sync::MutexGuard<'_, u32> {
        self.batch_streak.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A batch was answered: after [`GROW_AFTER`] in a row below `batch_size`, the batch size
    /// doubles (up to `batch_size`).
    fn batch_succeeded(&self) {
        let mut streak = self.streak();
        let cur = self.batch_limit.load(Ordering::Relaxed);
        if cur >= self.cfg.batch_size {
            *streak = 0;
            return;
        }
        *streak += 1;
        if *streak < GROW_AFTER {
            return;
        }
        *streak = 0;
        let new = cur.saturating_mul(2).min(self.cfg.batch_size);
        self.batch_limit.store(new, Ordering::Relaxed);
        metrics::gauge!("mistguard_moderation_batch_limit").set(new as f64);
        tracing::info!(
            target: LOG,
            from = cur,
            to = new,
            "moderation batches answered {GROW_AFTER} times in a row: batch size doubled"
        );
    }

    /// A batch failed: the streak of successes starts again.
    fn batch_failed(&self) {
        *self.streak() = 0;
    }

    /// A batch of `n` texts was refused (400/413): the batch size becomes half of the smaller of
    /// `n` and the current size (at least 1).
    fn shrink_batches(&self, n: usize) {
        let mut streak = self.streak();
        *streak = 0;
        let cur = self.batch_limit.load(Ordering::Relaxed);
        let new = (cur.min(n) / 2).max(1);
        if new >= cur {
            return;
        }
        self.batch_limit.store(new, Ordering::Relaxed);
        metrics::gauge!("mistguard_moderation_batch_limit").set(new as f64);
        tracing::info!(
            target: LOG,
            from = cur,
            to = new,
            "the moderation API refused a batch (400/413): batch size halved"
        );
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
                    if Instant::now()
                        .checked_add(wait)
                        .is_none_or(|t| t >= deadline)
                    {
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
                        let nb = later(Instant::now(), ra);
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
                    if now.checked_add(ra).is_none_or(|t| t >= deadline) {
                        return Err(give_up(format!(
                            "Retry-After of {} s is past the call's time left",
                            ra.as_secs()
                        )));
                    }
                    ra
                }
                None => backoff(self.cfg.backoff_base, attempt, unit_random()),
            };
            if now.checked_add(wait).is_none_or(|t| t >= deadline) {
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

    #[test]
    fn the_subject_map_is_capped_and_new_subjects_past_the_cap_go_unchecked() {
        let q = governor::Quota::per_hour(NonZeroU32::new(10).unwrap());
        let b = SubjectBudget::new(q, 2);
        let n = NonZeroU32::new(8).unwrap();
        assert_eq!(b.check("s1", n), Some(true));
        assert_eq!(b.check("s2", n), Some(true));
        assert_eq!(b.subjects.0.len(), 2);
        // Full: a new subject is not tracked (the total budget alone applies) ...
        assert_eq!(b.check("s3", n), None);
        assert_eq!(b.check("s3", n), None);
        assert_eq!(b.subjects.0.len(), 2);
        // ... while the tracked ones are still held to their budget.
        assert_eq!(b.check("s1", n), Some(false));
        assert_eq!(b.check("s2", NonZeroU32::new(2).unwrap()), Some(true));
        // A sweep keeps subjects whose budget is not whole again.
        b.sweep();
        assert_eq!(b.subjects.0.len(), 2);
    }

    #[tokio::test]
    async fn the_background_tasks_end_with_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "k\n").unwrap();
        let m = Moderator::new(ClientConfig {
            keys: super::super::KeySource {
                file: Some(path),
                ..Default::default()
            },
            subject_budget_tokens_per_hour: 100,
            ..ClientConfig::default()
        })
        .unwrap();
        assert_eq!(m.keys(), (1, 1));
        let weak = Arc::downgrade(&m.inner.shared);
        drop(m);
        // The batcher ends when its queue closes; the background task holds the client weakly.
        for _ in 0..200 {
            if weak.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the client is still held after it was dropped");
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
