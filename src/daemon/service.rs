//! The `mistguard.v1.Guard` service: requests in, the engine's verdicts out, with escalation,
//! limits, metrics and decision records around them.

use super::config::Limits;
use super::convert::{action_to_pb, direction_name, hit_to_pb, language_hint};
use super::escalation::Gate;
use super::front::rejected;
use super::ids::{DecisionIds, SubjectHasher, SubjectKey};
use super::moderate::StreamModeration;
use super::pb;
use super::recorder::Recorder;
use super::state::limits::{LimitDir, Limits as SubjectLimits};
use super::state::{now_ms, RecordOutcome, State};
use crate::action::Action;
use crate::engine::{ClassifyOptions, Engine, Hit};
use crate::verdict::StepResult;
use arc_swap::ArcSwap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

/// The answer to a suspended subject.
pub const SUSPENDED_MESSAGE: &str =
    "Requests from this caller are suspended pending review after repeated violations.";
/// The answer to a rate-limited subject.
pub const RATE_LIMITED_MESSAGE: &str =
    "Requests from this caller are rate limited after an attempt to extract the model.";

/// The answer to a subject over its request rate or byte budget.
pub const LIMITED_MESSAGE: &str =
    "This caller has used its request or byte budget for now; retry after retry_after_ms.";
/// The answer when the shared limits cannot be checked and `limits.when_redis_down = closed`.
pub const LIMITS_UNAVAILABLE_MESSAGE: &str =
    "Limits cannot be checked right now (shared state unreachable); retry shortly.";

const MAX_SUBJECT_BYTES: usize = 1024;

/// State shared by every RPC.
pub struct Shared {
    /// The engine serving new requests; replaced whole on reload. A stream keeps the `Arc` it
    /// started with.
    pub engine: ArcSwap<Engine>,
    pub limits: Limits,
    /// Per-subject state: escalation, suspensions, the review queue, limits (local or Redis).
    pub state: State,
    /// Decision records (`records.dir`); `None` when records are only log lines.
    pub records: Option<Recorder>,
    pub ids: DecisionIds,
    pub subjects: SubjectHasher,
    /// Unary calls in progress (load shedding: `try_acquire`, never a queue).
    pub inflight: Arc<Semaphore>,
    /// Streams open.
    pub streams: Arc<Semaphore>,
    /// Set when shutdown begins: new calls are refused with UNAVAILABLE.
    pub draining: AtomicBool,
    /// Turns `true` when shutdown begins: open streams send a final response and end.
    pub shutdown: watch::Receiver<bool>,
    /// Protected texts (ProtectText) and the key of their hashes and of canaries.
    pub protect: super::protect::ProtectStore,
    /// Key of hashed placeholders (`[EMAIL:1f2e3d4c5b6a]`).
    pub placeholder_key: crate::leak::LeakKey,
    /// Tool-call authorization: policies, approvals, settings.
    pub tools: super::tools::Tools,
    /// Remote moderation (`moderation.*`); `None` when no call can be moderated.
    pub moderation: Option<Arc<super::moderate::Moderation>>,
    /// Decisions since start by rule and action (the review console shows them).
    pub decision_counts: super::console::DecisionCounts,
}

#[derive(Clone)]
pub struct GuardService {
    shared: Arc<Shared>,
}

impl GuardService {
    pub fn new(shared: Arc<Shared>) -> GuardService {
        GuardService { shared }
    }
}

/// Counts and logs a refused call (see [`rejected`]) and returns its status.
fn reject(rpc: &'static str, reason: &'static str, status: Status) -> Status {
    rejected(rpc, reason, status.code());
    status
}

fn observe_hits(hits: &[Hit]) {
    for h in hits {
        metrics::counter!(
            "mistguard_hits_total",
            "rule" => h.rule_id.to_string(),
            "language" => h.language,
            "action" => h.action.as_str()
        )
        .increment(1);
    }
}

/// A request id is logged only if it looks like one (it is caller data).
pub(super) fn loggable_request_id(id: &str) -> &str {
    let ok = id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        id
    } else {
        "<invalid>"
    }
}

/// The metadata of a call, checked, with the subject already hashed.
struct CallMeta {
    subject: Option<SubjectKey>,
    opts: ClassifyOptions,
    direction: &'static str,
    request_id: String,
}

/// The fields of a request that [`CallMeta::parse`] reads.
struct MetaFields<'a> {
    subject: &'a str,
    language: &'a str,
    direction: i32,
    request_id: &'a str,
    protected_id: &'a str,
}

impl CallMeta {
    fn parse(rpc: &'static str, f: MetaFields<'_>, shared: &Shared) -> Result<CallMeta, Status> {
        let invalid = |m: String| reject(rpc, "invalid_argument", Status::invalid_argument(m));
        if f.subject.len() > MAX_SUBJECT_BYTES {
            return Err(invalid("subject is longer than 1024 bytes".into()));
        }
        let lang_hint = language_hint(f.language).map_err(invalid)?;
        let direction = direction_name(f.direction).map_err(invalid)?;
        let dir = match direction {
            "input" => crate::engine::Direction::Input,
            "output" => crate::engine::Direction::Output,
            "tool_arguments" => crate::engine::Direction::ToolArguments,
            _ => crate::engine::Direction::Unspecified,
        };
        let protected = if f.protected_id.is_empty() {
            None
        } else {
            // The id is not echoed: it is the caller's key to its protected text.
            Some(
                shared
                    .protect
                    .get(f.protected_id, Instant::now())
                    .ok_or_else(|| {
                        reject(
                            rpc,
                            "protected_id_unknown",
                            Status::not_found(
                                "protected_id is unknown or expired (or was issued before a restart): call ProtectText again",
                            ),
                        )
                    })?,
            )
        };
        // Canaries are looked for in every completion; a protected text where it is named.
        let leak = (protected.is_some() || dir == crate::engine::Direction::Output).then(|| {
            crate::engine::LeakOptions {
                key: shared.protect.key().clone(),
                protected: protected.into_iter().collect(),
                canaries: dir == crate::engine::Direction::Output,
            }
        });
        Ok(CallMeta {
            subject: (!f.subject.is_empty()).then(|| shared.subjects.hash(f.subject)),
            opts: ClassifyOptions {
                lang_hint,
                direction: dir,
                leak,
                placeholder_key: Some(shared.placeholder_key.clone()),
            },
            direction,
            request_id: loggable_request_id(f.request_id).to_string(),
        })
    }
}

/// One decision record: what was decided, about which call, by which rules. Metadata only.
pub(super) struct Record<'a> {
    pub rpc: &'static str,
    pub decision_id: &'a str,
    pub direction: &'static str,
    pub subject: Option<SubjectKey>,
    pub request_id: &'a str,
    /// The action's name (`block`; for a tool call `allow`, `deny` or `require_approval`).
    pub action: &'static str,
    pub rules: &'a [&'a str],
    /// The hits (rule, trigger, score, span) for the record file.
    pub hits: &'a [Hit],
    /// The language the engine settled on (as in the response); `None` when undecided.
    pub language: Option<&'a str>,
    pub level: u32,
    pub reason: &'a str,
    pub bytes: u64,
    /// Keyed hash of the text (hex), "" when there was none.
    pub text_hash: String,
    /// The `version` of the rulesets that decided (the stream's own, across a reload).
    pub ruleset_version: &'a str,
    pub policy_version: &'a str,
    /// The remote moderation model that answered, "" when none did.
    pub moderation_model: &'a str,
    pub started: Instant,
}

/// Writes a decision record's log line: metadata only. ALLOW decisions are DEBUG (a busy daemon
/// makes thousands a second, and `mistguard_decisions_total` counts them); every other action is
/// INFO.
fn log_decision(r: &Record<'_>) {
    macro_rules! record {
        ($lvl:expr) => {{
            let subject = r.subject.map(|s| s.short());
            tracing::event!(
                target: "mistguard::decision",
                $lvl,
                decision_id = r.decision_id,
                rpc = r.rpc,
                request_id = %r.request_id,
                direction = r.direction,
                subject_hash = subject.as_deref().unwrap_or(""),
                action = r.action,
                rules = %r.rules.join(","),
                language = r.language.unwrap_or(""),
                escalation_level = r.level,
                reason = r.reason,
                bytes = r.bytes,
                ruleset_version = r.ruleset_version,
                micros = r.started.elapsed().as_micros() as u64,
                "decision"
            )
        }};
    }
    if r.action == "allow" {
        record!(tracing::Level::DEBUG)
    } else {
        record!(tracing::Level::INFO)
    }
}

/// One WARN line, target `mistguard::escalation`, when a decision puts its subject at level 2.
fn log_escalation(
    subject: Option<&SubjectKey>,
    decision_id: &str,
    outcome: &RecordOutcome,
    suspension: Duration,
) {
    if outcome.suspended_now {
        let subject = subject.map(|s| s.short());
        tracing::warn!(
            target: "mistguard::escalation",
            subject_hash = subject.as_deref().unwrap_or(""),
            decision_id,
            escalation_level = outcome.level,
            suspended_s = suspension.as_secs(),
            "subject suspended (escalation level 2): queued for review"
        );
    }
}

/// What a stream's decision record needs of the hits reported so far: the distinct rules and the
/// most severe action (not the hits themselves, which went to the client).
#[derive(Default)]
struct StreamHits {
    rules: Vec<std::sync::Arc<str>>,
    action: Action,
    /// With `records.dir`, the first [`MAX_RECORD_HITS`] hits, for the decision record's file
    /// (without it nothing is kept: the log line lists only the rules).
    kept: Vec<Hit>,
    keep: bool,
}

/// What a stream's remote moderation windows brought so far.
#[derive(Default)]
struct RemoteSeen {
    /// The most severe action of remote (or fail-closed) hits.
    action: Action,
    /// A window's answer was late or failed.
    unavailable: bool,
}

impl RemoteSeen {
    /// Takes in a window's verdict: counts its hits, notes novel attacks (remote hits while the
    /// stream's local rules had none) and the answering model; returns the hits to report.
    fn take(
        &mut self,
        shared: &Shared,
        c: &super::moderate::Checked,
        local: Action,
        log: &mut StreamLog,
    ) -> Vec<Hit> {
        self.unavailable |= c.unavailable.is_some();
        if c.model.is_some() {
            log.model.clone_from(&c.model);
        }
        // Novel: the remote model flags what the local rules passed (as in Classify).
        if local == Action::Allow && !c.categories.is_empty() {
            if let Some(m) = &shared.moderation {
                m.novel(&c.categories, now_ms());
            }
        }
        if !c.hits.is_empty() {
            observe_hits(&c.hits);
            if c.unavailable.is_some() {
                // Fail-closed hits: in the record, not counted toward escalation.
                log.hits.keep_only(&c.hits);
            } else {
                log.hits.add(&c.hits);
                log.level = log.level.max(1);
            }
        }
        for h in &c.hits {
            self.action = self.action.max(h.action);
        }
        c.hits.clone()
    }
}

/// Hits a decision record lists at most (a stream may report many).
const MAX_RECORD_HITS: usize = 256;

impl StreamHits {
    fn add(&mut self, hits: &[Hit]) {
        for h in hits {
            if !self.rules.contains(&h.rule_id) {
                self.rules.push(h.rule_id.clone());
            }
            self.action = self.action.max(h.action);
            if self.keep && self.kept.len() < MAX_RECORD_HITS {
                self.kept.push(h.clone());
            }
        }
    }

    /// Keeps hits for the record's file without counting their rules (fail-closed hits).
    fn keep_only(&mut self, hits: &[Hit]) {
        for h in hits {
            if self.keep && self.kept.len() < MAX_RECORD_HITS {
                self.kept.push(h.clone());
            }
        }
    }

    fn rules(&self) -> Vec<&str> {
        let mut rules: Vec<&str> = self.rules.iter().map(|r| &**r).collect();
        rules.sort_unstable();
        rules
    }
}

/// What escalation counts of a decision's hits: the most severe action and the distinct rules of
/// every hit but the fail-closed ones (`moderation.unavailable`: an outage, not a violation).
fn violations(hits: &[Hit]) -> (Action, Vec<&str>) {
    let real: Vec<&Hit> = hits
        .iter()
        .filter(|h| &*h.trigger_id != crate::moderation::UNAVAILABLE_TRIGGER)
        .collect();
    let action = real.iter().map(|h| h.action).max().unwrap_or_default();
    let mut rules: Vec<&str> = real.iter().map(|h| &*h.rule_id).collect();
    rules.sort_unstable();
    rules.dedup();
    (action, rules)
}

fn distinct_rules(hits: &[Hit]) -> Vec<&str> {
    let mut rules: Vec<&str> = hits.iter().map(|h| &*h.rule_id).collect();
    rules.sort_unstable();
    rules.dedup();
    rules
}

impl Shared {
    pub(super) fn admit(&self, rpc: &'static str) -> Result<(), Status> {
        if self.draining.load(Ordering::Acquire) {
            return Err(reject(
                rpc,
                "draining",
                Status::unavailable("mistguard is shutting down"),
            ));
        }
        Ok(())
    }

    fn check_size(&self, len: usize) -> Result<(), Status> {
        if len > self.limits.max_message_bytes {
            return Err(reject(
                "classify",
                "message_too_large",
                Status::resource_exhausted(format!(
                    "text is {len} bytes; the limit is {} bytes (max_message_bytes)",
                    self.limits.max_message_bytes
                )),
            ));
        }
        Ok(())
    }

    async fn gate(&self, subject: Option<&SubjectKey>) -> Gate {
        match subject {
            Some(s) => self.state.gate(s, now_ms()).await,
            None => Gate::Open { level: 0 },
        }
    }

    async fn record_outcome(
        &self,
        subject: Option<&SubjectKey>,
        decision_id: &str,
        action: Action,
        rules: &[&str],
    ) -> RecordOutcome {
        match subject {
            Some(s) => {
                self.state
                    .record(s, decision_id, action, rules, now_ms())
                    .await
            }
            None => RecordOutcome {
                level: u32::from(!rules.is_empty()),
                ..RecordOutcome::default()
            },
        }
    }

    /// The per-subject limits of a call: `Some((retry_after_ms, reason))` when it is over.
    async fn over_limit(
        &self,
        subject: Option<&SubjectKey>,
        dir: crate::engine::Direction,
        costs: [Option<u64>; 2],
    ) -> Option<(u64, &'static str)> {
        let subject = subject?;
        let dir = limit_dir(dir);
        if !self.state.limits.any(dir) {
            return None;
        }
        self.state
            .limit(subject, dir, costs, now_ms())
            .await
            .map(|l| (l.retry_after.as_millis().max(1) as u64, l.reason))
    }

    /// Writes the decision record: its log line always, and with `records.dir` its line in the
    /// records (and in the RULE-MIST-005 report sink; `sample` goes to the opt-in RULE-MIST-007
    /// samples). In `sync` mode this returns once the record is on disk; when it cannot be
    /// written and `records.on_error = fail_closed`, the call fails with UNAVAILABLE.
    pub(super) async fn write_record(
        &self,
        r: &Record<'_>,
        sample: Option<&str>,
    ) -> Result<(), Status> {
        log_decision(r);
        self.decision_counts.count(r.rules, r.action);
        self.persist_record(r, sample).await
    }

    /// Writes the record to the record files only (see [`Shared::write_record`]).
    pub(super) async fn persist_record(
        &self,
        r: &Record<'_>,
        sample: Option<&str>,
    ) -> Result<(), Status> {
        let Some(rec) = &self.records else {
            return Ok(());
        };
        rec.write(r, sample).await.map_err(|()| {
            reject(
                r.rpc,
                "records_unavailable",
                Status::unavailable(
                    "the decision record could not be written (records.on_error = fail_closed); retry later",
                ),
            )
        })
    }

    /// The keyed hash of a text for its decision record (hex), "" without records.
    fn text_hash(&self, text: &str) -> String {
        self.records
            .as_ref()
            .map(|r| r.text_hash(text.as_bytes()))
            .unwrap_or_default()
    }

    async fn classify(
        &self,
        req: pb::ClassifyRequest,
        started: Instant,
    ) -> Result<pb::ClassifyResponse, Status> {
        self.admit("classify")?;
        let Ok(_permit) = self.inflight.try_acquire() else {
            return Err(reject(
                "classify",
                "overloaded",
                Status::resource_exhausted("mistguard is overloaded; retry later"),
            ));
        };
        self.check_size(req.text.len())?;
        let meta = CallMeta::parse(
            "classify",
            MetaFields {
                subject: &req.subject,
                language: &req.language,
                direction: req.direction,
                request_id: &req.request_id,
                protected_id: &req.protected_id,
            },
            self,
        )?;
        let decision_id = self.ids.next();
        let bytes = req.text.len() as u64;
        let text_hash = self.text_hash(&req.text);
        let engine = self.engine.load_full();
        let subject = meta.subject.as_ref();
        let mut forced = refusal(self.gate(subject).await);
        if forced.is_none() {
            let costs = SubjectLimits::request_costs(Some(bytes));
            if let Some((retry, reason)) =
                self.over_limit(subject, meta.opts.direction, costs).await
            {
                forced = Some(limited(retry, reason));
            }
        }
        if let Some(f) = forced {
            metrics::counter!("mistguard_rejected_total", "reason" => f.reason).increment(1);
            metrics::counter!("mistguard_decisions_total", "rpc" => "classify", "action" => f.action.as_str()).increment(1);
            self.write_record(
                &Record {
                    rpc: "classify",
                    decision_id: &decision_id,
                    direction: meta.direction,
                    subject: meta.subject,
                    request_id: &meta.request_id,
                    action: f.action.as_str(),
                    rules: &[],
                    hits: &[],
                    language: None,
                    level: f.level,
                    reason: f.reason,
                    bytes,
                    text_hash,
                    ruleset_version: engine.version(),
                    policy_version: "",
                    moderation_model: "",
                    started,
                },
                None,
            )
            .await?;
            return Ok(pb::ClassifyResponse {
                action: action_to_pb(f.action) as i32,
                escalation_level: f.level,
                message: f.message.to_string(),
                decision_id,
                reason: f.reason.to_string(),
                ruleset_version: engine.version().to_string(),
                retry_after_ms: f.retry_after_ms,
                ..Default::default()
            });
        }
        let mut verdict = engine.classify(&req.text, &meta.opts);
        let mut reason = "";
        let mut model = None;
        let mut novel = false;
        if let Some(m) = &self.moderation {
            if !req.text.is_empty() && m.wants(meta.opts.direction, verdict.action, req.moderate) {
                let subject_hex = subject.map(SubjectKey::hex);
                let checked = m
                    .check(
                        &engine,
                        &req.text,
                        meta.opts.direction,
                        subject_hex.as_deref(),
                        (0, bytes),
                    )
                    .await;
                if verdict.action == Action::Allow && !checked.categories.is_empty() {
                    m.novel(&checked.categories, now_ms());
                    novel = true;
                }
                super::moderate::merge(&engine, &mut verdict, &checked);
                reason = checked.reason();
                model = checked.model;
            }
        }
        let rules = distinct_rules(&verdict.hits);
        // RULE-MIST-007 retraining samples keep the text, only where the operator opted in.
        let sample = (rules.contains(&"RULE-MIST-007")
            && self.records.as_ref().is_some_and(|r| r.keeps_samples()))
        .then_some(&req.text);
        // A rule failed closed in an outage was not violated: it does not escalate.
        let (esc_action, esc_rules) = violations(&verdict.hits);
        let outcome = self
            .record_outcome(subject, &decision_id, esc_action, &esc_rules)
            .await;
        log_escalation(subject, &decision_id, &outcome, self.state.suspension());
        observe_hits(&verdict.hits);
        metrics::counter!("mistguard_bytes_scanned_total", "rpc" => "classify").increment(bytes);
        metrics::counter!("mistguard_decisions_total", "rpc" => "classify", "action" => verdict.action.as_str())
            .increment(1);
        self.write_record(
            &Record {
                rpc: "classify",
                decision_id: &decision_id,
                direction: meta.direction,
                subject: meta.subject,
                request_id: &meta.request_id,
                action: verdict.action.as_str(),
                rules: &rules,
                hits: &verdict.hits,
                language: verdict.language,
                level: outcome.level,
                reason,
                bytes,
                text_hash,
                ruleset_version: engine.version(),
                policy_version: "",
                moderation_model: model.as_deref().unwrap_or(""),
                started,
            },
            sample.map(String::as_str),
        )
        .await?;
        if novel {
            if let Some(r) = &self.records {
                r.write_novel(&decision_id, &rules, verdict.language, &req.text)
                    .await;
            }
        }
        Ok(pb::ClassifyResponse {
            action: action_to_pb(verdict.action) as i32,
            hits: verdict.hits.iter().map(hit_to_pb).collect(),
            language: verdict.language.unwrap_or("").to_string(),
            escalation_level: outcome.level,
            sanitized_text: verdict.sanitized_text,
            message: verdict.message.unwrap_or_default(),
            decision_id,
            reason: reason.to_string(),
            ruleset_version: engine.version().to_string(),
            retry_after_ms: 0,
        })
    }
}

/// Which limits a direction pays: completions their own, everything else the prompts'.
fn limit_dir(d: crate::engine::Direction) -> LimitDir {
    match d {
        crate::engine::Direction::Output => LimitDir::Output,
        _ => LimitDir::Input,
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<pb::ClassifyStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::guard_server::Guard for GuardService {
    async fn classify(
        &self,
        req: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let started = Instant::now();
        self.shared
            .classify(req.into_inner(), started)
            .await
            .map(Response::new)
    }

    type ClassifyStreamStream = ResponseStream;

    async fn classify_stream(
        &self,
        req: Request<Streaming<pb::ClassifyStreamRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        let started = Instant::now();
        let permit = self.shared.admit("classify_stream").and_then(|()| {
            self.shared
                .streams
                .clone()
                .try_acquire_owned()
                .map_err(|_| {
                    reject(
                        "classify_stream",
                        "overloaded",
                        Status::resource_exhausted("too many open streams; retry later"),
                    )
                })
        })?;
        let (tx, rx) = mpsc::channel(8);
        let task = StreamTask {
            shared: self.shared.clone(),
            inbound: req.into_inner(),
            tx,
            started,
            _permit: permit,
            _active: ActiveStream::open(),
        };
        tokio::spawn(task.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ping(
        &self,
        _req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        self.shared
            .admit("ping")
            .map(|()| Response::new(pb::PingResponse {}))
    }

    async fn authorize_tool_call(
        &self,
        req: Request<pb::AuthorizeToolCallRequest>,
    ) -> Result<Response<pb::AuthorizeToolCallResponse>, Status> {
        let started = Instant::now();
        let shared = self.shared.clone();
        // Policies and the content scan are CPU work of tens of microseconds: inline.
        shared
            .authorize_tool_call(req.into_inner(), started)
            .await
            .map(Response::new)
    }

    async fn protect_text(
        &self,
        req: Request<pb::ProtectTextRequest>,
    ) -> Result<Response<pb::ProtectTextResponse>, Status> {
        const RPC: &str = "protect_text";
        self.shared.admit(RPC)?;
        let req = req.into_inner();
        if req.text.len() > self.shared.limits.max_message_bytes {
            return Err(reject(
                RPC,
                "message_too_large",
                Status::resource_exhausted(format!(
                    "text is {} bytes; the limit is {} bytes (max_message_bytes)",
                    req.text.len(),
                    self.shared.limits.max_message_bytes
                )),
            ));
        }
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds.into()));
        // Hashing a long text takes a while: off the async threads.
        let shared = self.shared.clone();
        let result = tokio::task::spawn_blocking(move || {
            shared
                .protect
                .protect(&req.text, ttl, req.canary, Instant::now())
        })
        .await
        .map_err(|_| Status::internal("protect_text failed"))?;
        use super::protect::ProtectError;
        match result {
            Ok(p) => {
                metrics::counter!("mistguard_protected_total").increment(1);
                // Metadata only: never the text, its id or its canary.
                tracing::info!(
                    target: "mistguard::protect",
                    shingles = p.shingles,
                    ttl_s = p.ttl.as_secs(),
                    canary = p.canary.is_some(),
                    "text protected"
                );
                Ok(Response::new(pb::ProtectTextResponse {
                    protected_id: p.id,
                    canary: p.canary.unwrap_or_default(),
                    ttl_seconds: u32::try_from(p.ttl.as_secs()).unwrap_or(u32::MAX),
                    shingles: u32::try_from(p.shingles).unwrap_or(u32::MAX),
                }))
            }
            Err(ProtectError::Empty) => Err(reject(
                RPC,
                "invalid_argument",
                Status::invalid_argument("text has no words to protect"),
            )),
            Err(ProtectError::TtlTooLong(t)) => Err(reject(
                RPC,
                "invalid_argument",
                Status::invalid_argument(format!(
                    "ttl_seconds {} is over the daemon's protect.max_ttl ({}s)",
                    t.as_secs(),
                    self.shared.protect.max_ttl().as_secs()
                )),
            )),
            Err(ProtectError::Full) => Err(reject(
                RPC,
                "protected_set_full",
                Status::resource_exhausted(
                    "the protected set is full (protect.max_texts / protect.max_bytes); retry once older texts expire",
                ),
            )),
            Err(ProtectError::Random) => Err(Status::internal("no random source for the id")),
        }
    }
}

/// Counts an open stream in the gauge for as long as it lives, whatever way it ends.
struct ActiveStream;

impl ActiveStream {
    fn open() -> ActiveStream {
        metrics::gauge!("mistguard_active_streams").increment(1.0);
        ActiveStream
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        metrics::gauge!("mistguard_active_streams").decrement(1.0);
    }
}

/// One ClassifyStream call, run as its own task so it can end itself on shutdown, idleness or
/// a limit, whatever the client does.
struct StreamTask {
    shared: Arc<Shared>,
    inbound: Streaming<pb::ClassifyStreamRequest>,
    tx: mpsc::Sender<Result<pb::ClassifyStreamResponse, Status>>,
    started: Instant,
    _permit: OwnedSemaphorePermit,
    _active: ActiveStream,
}

enum Next {
    Message(pb::ClassifyStreamRequest),
    /// A moderation window's remote verdict.
    Remote(super::moderate::WindowVerdict),
    End,
    Failed(Status),
    Idle,
    Shutdown,
    ClientGone,
}

impl StreamTask {
    async fn next(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        idle: Duration,
        remote: Option<&mut StreamModeration>,
    ) -> Next {
        if *shutdown.borrow() {
            return Next::Shutdown;
        }
        let verdict = async {
            match remote {
                Some(r) => r.rx.recv().await,
                None => None,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => Next::Shutdown,
            _ = self.tx.closed() => Next::ClientGone,
            Some(v) = verdict => Next::Remote(v),
            msg = tokio::time::timeout(idle, self.inbound.message()) => match msg {
                Err(_) => Next::Idle,
                Ok(Ok(Some(m))) => Next::Message(m),
                Ok(Ok(None)) => Next::End,
                Ok(Err(status)) => Next::Failed(status),
            },
        }
    }

    async fn send(&self, r: Result<pb::ClassifyStreamResponse, Status>) -> bool {
        self.tx.send(r).await.is_ok()
    }

    async fn run(mut self) {
        // The call is counted by `front` when its trailers go out (or it is dropped).
        self.run_inner().await;
    }

    async fn run_inner(&mut self) {
        let shared = self.shared.clone();
        let limits = &shared.limits;
        let mut shutdown = shared.shutdown.clone();
        let idle = limits.stream_idle_timeout;

        let first = match self.next(&mut shutdown, idle, None).await {
            Next::Message(m) => m,
            other => return self.end_early(other).await,
        };
        let meta = match CallMeta::parse(
            "classify_stream",
            MetaFields {
                subject: &first.subject,
                language: &first.language,
                direction: first.direction,
                request_id: &first.request_id,
                protected_id: &first.protected_id,
            },
            &shared,
        ) {
            Ok(m) => m,
            Err(status) => {
                self.send(Err(status)).await;
                return;
            }
        };
        // The stream keeps this engine to its end, even across a reload.
        let engine = shared.engine.load_full();
        let mut log = StreamLog {
            decision_id: shared.ids.next(),
            meta,
            ruleset_version: engine.version().to_string(),
            hits: StreamHits {
                keep: shared.records.is_some(),
                ..StreamHits::default()
            },
            language: None,
            level: 0,
            bytes: 0,
            text: shared.records.as_ref().map(|r| r.text_hasher()),
            model: None,
            started: self.started,
        };
        let subject = log.meta.subject;
        let dir = log.meta.opts.direction;
        let mut forced = refusal(shared.gate(subject.as_ref()).await);
        if forced.is_none() {
            let costs = SubjectLimits::request_costs(Some(first.text.len() as u64));
            if let Some((retry, reason)) = shared.over_limit(subject.as_ref(), dir, costs).await {
                forced = Some(limited(retry, reason));
            }
        }
        if let Some(f) = forced {
            metrics::counter!("mistguard_rejected_total", "reason" => f.reason).increment(1);
            metrics::counter!("mistguard_decisions_total", "rpc" => "classify_stream", "action" => f.action.as_str())
                .increment(1);
            log.level = f.level;
            log.bytes = first.text.len() as u64;
            if let Some(h) = &mut log.text {
                h.update(first.text.as_bytes());
            }
            if let Err(status) = log.end(&shared, Some(f.action), f.reason).await {
                self.send(Err(status)).await;
                return;
            }
            self.send(Ok(f.stream_response(log, f.level, 0))).await;
            return;
        }
        // Later chunks pay the byte budget as they come.
        let chunk_budget = subject.is_some() && shared.state.limits.has_bytes(limit_dir(dir));

        let mut session = engine.session(&log.meta.opts);
        // Each step's hits go to the client as they come: the session need not keep them.
        session.discard_verdict_hits();
        session.compose_released_text();
        let mut chunks: u64 = 0;
        // Remote moderation of the stream's windows, when its direction's policy may want it.
        let mut remote = shared
            .moderation
            .as_ref()
            .filter(|m| m.policy(dir) != super::config::ModerationPolicy::Never)
            .map(|m| {
                StreamModeration::new(
                    m.clone(),
                    engine.clone(),
                    dir,
                    subject.as_ref().map(SubjectKey::hex),
                    first.moderate,
                )
            });
        let mut remote_seen = RemoteSeen::default();
        let mut pending = Some(first);
        // What the client was last told it may forward.
        let mut released: u64 = 0;

        let (step, reason) = loop {
            let msg = match pending.take() {
                Some(m) => m,
                None => match self.next(&mut shutdown, idle, remote.as_mut()).await {
                    Next::Message(m) => m,
                    Next::Remote(v) => {
                        let Some(r) = remote.as_mut() else { continue };
                        r.arrived(&v);
                        let hits =
                            remote_seen.take(&shared, &v.checked, session.action(), &mut log);
                        let action = session.action().max(remote_seen.action);
                        let message =
                            super::moderate::message_of(&engine, &hits, action, log.language);
                        if action >= Action::Block {
                            break (
                                StepResult {
                                    action,
                                    hits,
                                    release_offset: released,
                                    language: log.language,
                                    message,
                                    released_text: None,
                                },
                                "blocked",
                            );
                        }
                        // Strict mode: text held for this window may go now.
                        let (offset, text) = r.release(released, None);
                        if hits.is_empty() && v.checked.unavailable.is_none() && offset == released
                        {
                            // Nothing to tell the client.
                            continue;
                        }
                        released = offset;
                        let response = pb::ClassifyStreamResponse {
                            action: action_to_pb(action) as i32,
                            hits: hits.iter().map(hit_to_pb).collect(),
                            released_bytes: released,
                            released_text: text,
                            language: log.language.unwrap_or("").to_string(),
                            escalation_level: log.level,
                            message: message.unwrap_or_default(),
                            decision_id: log.decision_id.clone(),
                            r#final: false,
                            reason: v.checked.reason().to_string(),
                            ruleset_version: log.ruleset_version.clone(),
                            retry_after_ms: 0,
                        };
                        if !self.send(Ok(response)).await {
                            let _ = log.end(&shared, None, "cancelled").await;
                            return;
                        }
                        continue;
                    }
                    Next::End => break (session.finish(), "end_of_input"),
                    Next::Shutdown => break (session.finish(), "shutdown"),
                    Next::Idle => {
                        let status = reject(
                            "classify_stream",
                            "idle_timeout",
                            Status::deadline_exceeded(format!(
                                "stream idle for more than {}s",
                                idle.as_secs_f32()
                            )),
                        );
                        let _ = log.end(&shared, None, "idle_timeout").await;
                        self.send(Err(status)).await;
                        return;
                    }
                    Next::ClientGone => {
                        let _ = log.end(&shared, None, "cancelled").await;
                        return;
                    }
                    Next::Failed(status) => {
                        let status = stream_decode_error(status, limits.max_message_bytes);
                        let _ = log.end(&shared, None, "malformed").await;
                        self.send(Err(status)).await;
                        return;
                    }
                },
            };
            chunks += 1;
            log.bytes += msg.text.len() as u64;
            let over = if msg.text.len() > limits.max_message_bytes {
                Some((
                    "message_too_large",
                    format!(
                        "chunk is {} bytes; the limit is {} bytes (max_message_bytes)",
                        msg.text.len(),
                        limits.max_message_bytes
                    ),
                ))
            } else if chunks > limits.stream_max_chunks {
                Some((
                    "stream_chunks",
                    format!(
                        "stream exceeded {} chunks (stream_max_chunks)",
                        limits.stream_max_chunks
                    ),
                ))
            } else if log.bytes > limits.stream_max_bytes {
                Some((
                    "stream_bytes",
                    format!(
                        "stream exceeded {} bytes (stream_max_bytes)",
                        limits.stream_max_bytes
                    ),
                ))
            } else {
                None
            };
            if let Some((reason, text)) = over {
                let _ = log.end(&shared, None, reason).await;
                self.send(Err(reject(
                    "classify_stream",
                    reason,
                    Status::resource_exhausted(text),
                )))
                .await;
                return;
            }
            if chunk_budget && chunks > 1 {
                let costs = SubjectLimits::chunk_costs(msg.text.len() as u64);
                if let Some((retry, reason)) = shared.over_limit(subject.as_ref(), dir, costs).await
                {
                    // Over the byte budget mid-stream: nothing more is released.
                    metrics::counter!("mistguard_rejected_total", "reason" => reason).increment(1);
                    metrics::counter!("mistguard_decisions_total", "rpc" => "classify_stream", "action" => "rate_limit")
                        .increment(1);
                    let f = limited(retry, reason);
                    if let Err(status) = log.end(&shared, Some(f.action), f.reason).await {
                        self.send(Err(status)).await;
                        return;
                    }
                    let level = log.level;
                    self.send(Ok(f.stream_response(log, level, released))).await;
                    return;
                }
            }
            if let Some(h) = &mut log.text {
                h.update(msg.text.as_bytes());
            }
            metrics::counter!("mistguard_stream_chunks_total").increment(1);
            metrics::counter!("mistguard_bytes_scanned_total", "rpc" => "classify_stream")
                .increment(msg.text.len() as u64);
            let step = session.feed(&msg.text);
            if let (Some(r), true) = (remote.as_mut(), step.action < Action::Block) {
                r.push(&msg.text, step.action.max(remote_seen.action));
            }
            drop(msg);
            if step.language.is_some() {
                log.language = step.language;
            }
            if !step.hits.is_empty() {
                observe_hits(&step.hits);
                log.hits.add(&step.hits);
                log.level = log.level.max(1);
            }
            if step.action >= Action::Block {
                break (step, "blocked");
            }
            let released_text = match remote.as_mut() {
                Some(r) => {
                    let (offset, text) = r.release(step.release_offset, step.released_text);
                    released = offset;
                    text
                }
                None => {
                    released = step.release_offset;
                    step.released_text.unwrap_or_default()
                }
            };
            let response = pb::ClassifyStreamResponse {
                action: action_to_pb(step.action.max(remote_seen.action)) as i32,
                hits: step.hits.iter().map(hit_to_pb).collect(),
                released_bytes: released,
                released_text,
                language: step.language.unwrap_or("").to_string(),
                escalation_level: log.level,
                message: step.message.unwrap_or_default(),
                decision_id: log.decision_id.clone(),
                r#final: false,
                reason: String::new(),
                ruleset_version: log.ruleset_version.clone(),
                retry_after_ms: 0,
            };
            if !self.send(Ok(response)).await {
                let _ = log.end(&shared, None, "cancelled").await;
                return;
            }
        };

        // The final response: the verdict of the whole stream.
        let mut step = step;
        if reason != "blocked" && !step.hits.is_empty() {
            observe_hits(&step.hits);
            log.hits.add(&step.hits);
        }
        if step.language.is_some() {
            log.language = step.language;
        }
        // The last window, and every verdict still on its way (each is bounded by the deadline).
        if let (Some(r), false) = (remote.as_mut(), reason == "blocked") {
            r.finish(step.action.max(remote_seen.action));
            let wait = shared
                .moderation
                .as_ref()
                .map_or(Duration::ZERO, |m| m.cfg.deadline)
                .saturating_mul(2);
            let local = step.action;
            while r.in_flight() > 0 {
                let v = match tokio::time::timeout(wait, r.rx.recv()).await {
                    Ok(Some(v)) => vec![v],
                    // Waited long enough: what is still out gets its fail mode.
                    _ => r.give_up(),
                };
                for v in v {
                    r.arrived(&v);
                    let hits = remote_seen.take(&shared, &v.checked, local, &mut log);
                    step.hits.extend(hits);
                }
            }
            let action = step.action.max(remote_seen.action);
            if action > step.action {
                step.message =
                    super::moderate::message_of(&engine, &step.hits, action, log.language);
            }
            step.action = action;
            if action < Action::Block {
                let (offset, text) = r.release(step.release_offset, step.released_text.take());
                step.release_offset = offset;
                step.released_text = Some(text);
            }
        }
        let action = step.action;
        let outcome = shared
            .record_outcome(
                subject.as_ref(),
                &log.decision_id,
                action,
                &log.hits.rules(),
            )
            .await;
        log_escalation(
            subject.as_ref(),
            &log.decision_id,
            &outcome,
            shared.state.suspension(),
        );
        metrics::counter!("mistguard_decisions_total", "rpc" => "classify_stream", "action" => action.as_str()).increment(1);
        log.level = outcome.level;
        if let Err(status) = log.end(&shared, Some(action), reason).await {
            self.send(Err(status)).await;
            return;
        }
        // The engine releases past a hit once it is reported (the client can act on its span);
        // after a block nothing more may be forwarded, so the release stays where it was.
        let (released_bytes, released_text) = if action >= Action::Block {
            (released, String::new())
        } else {
            (step.release_offset, step.released_text.unwrap_or_default())
        };
        let response = pb::ClassifyStreamResponse {
            action: action_to_pb(action) as i32,
            hits: step.hits.iter().map(hit_to_pb).collect(),
            released_bytes,
            released_text,
            language: log.language.unwrap_or("").to_string(),
            escalation_level: outcome.level,
            message: step.message.unwrap_or_default(),
            decision_id: log.decision_id,
            r#final: true,
            reason: if remote_seen.unavailable {
                format!("{reason},moderation_unavailable")
            } else {
                reason.to_string()
            },
            ruleset_version: log.ruleset_version,
            retry_after_ms: 0,
        };
        self.send(Ok(response)).await;
    }

    async fn end_early(&mut self, next: Next) {
        match next {
            Next::Message(_) | Next::Remote(_) => unreachable!("handled by the caller"),
            // Half-closed before any chunk: an empty stream, allowed.
            Next::End | Next::Shutdown => {
                let decision_id = self.shared.ids.next();
                let reason = if matches!(next, Next::End) {
                    "end_of_input"
                } else {
                    "shutdown"
                };
                self.send(Ok(pb::ClassifyStreamResponse {
                    action: pb::Action::Allow as i32,
                    decision_id,
                    r#final: true,
                    reason: reason.to_string(),
                    ruleset_version: self.shared.engine.load().version().to_string(),
                    ..Default::default()
                }))
                .await;
            }
            Next::Idle => {
                let idle = self.shared.limits.stream_idle_timeout;
                self.send(Err(reject(
                    "classify_stream",
                    "idle_timeout",
                    Status::deadline_exceeded(format!(
                        "stream idle for more than {}s",
                        idle.as_secs_f32()
                    )),
                )))
                .await;
            }
            Next::ClientGone => {}
            Next::Failed(status) => {
                let status = stream_decode_error(status, self.shared.limits.max_message_bytes);
                self.send(Err(status)).await;
            }
        }
    }
}

/// What a stream's decision record is made of, gathered as the stream goes.
struct StreamLog {
    decision_id: String,
    meta: CallMeta,
    ruleset_version: String,
    hits: StreamHits,
    /// The language once the engine decided it (the hint, or detection).
    language: Option<&'static str>,
    level: u32,
    bytes: u64,
    /// The keyed hash of the stream's text so far (with records on).
    text: Option<blake3::Hasher>,
    /// The remote moderation model that answered for a window, if any.
    model: Option<Arc<str>>,
    started: Instant,
}

impl StreamLog {
    /// Writes the stream's one decision record; `action` defaults to the most severe hit's.
    async fn end(
        &self,
        shared: &Shared,
        action: Option<Action>,
        reason: &str,
    ) -> Result<(), Status> {
        let rules = self.hits.rules();
        let mut level = self.level;
        if action.is_none() && !rules.is_empty() {
            // A stream that ends without its verdict (cancelled, idle, over a limit) still
            // counts toward its subject's escalation with the hits it reported.
            let outcome = shared
                .record_outcome(
                    self.meta.subject.as_ref(),
                    &self.decision_id,
                    self.hits.action,
                    &rules,
                )
                .await;
            level = outcome.level;
        }
        shared
            .write_record(
                &Record {
                    rpc: "classify_stream",
                    decision_id: &self.decision_id,
                    direction: self.meta.direction,
                    subject: self.meta.subject,
                    request_id: &self.meta.request_id,
                    action: action.unwrap_or(self.hits.action).as_str(),
                    rules: &rules,
                    hits: &self.hits.kept,
                    language: self.language,
                    level,
                    reason,
                    bytes: self.bytes,
                    text_hash: self
                        .text
                        .as_ref()
                        .map(|h| h.finalize().to_hex().to_string())
                        .unwrap_or_default(),
                    ruleset_version: &self.ruleset_version,
                    policy_version: "",
                    moderation_model: self.model.as_deref().unwrap_or(""),
                    started: self.started,
                },
                None,
            )
            .await
    }
}

/// Maps an error reading the request stream: an oversized message becomes RESOURCE_EXHAUSTED;
/// a message that does not decode (invalid UTF-8 in a string, bad wire format) INVALID_ARGUMENT.
/// The decoder's text never holds request content, but it is replaced anyway.
fn stream_decode_error(status: Status, limit: usize) -> Status {
    match status.code() {
        Code::OutOfRange => reject(
            "classify_stream",
            "message_too_large",
            Status::resource_exhausted(format!(
                "message larger than {limit} bytes (max_message_bytes)"
            )),
        ),
        Code::Internal if status.message().contains("decode") => reject(
            "classify_stream",
            "malformed",
            Status::invalid_argument("malformed message (invalid protobuf or UTF-8)"),
        ),
        Code::Cancelled => status,
        _ => reject("classify_stream", "malformed", status),
    }
}

/// A call answered without looking at its text: a suspended or rate-limited subject, or one over
/// its per-subject limits.
#[derive(Clone, Copy, Debug)]
struct Forced {
    action: Action,
    level: u32,
    reason: &'static str,
    message: &'static str,
    retry_after_ms: u64,
}

/// The answer for a subject the escalation gate stops, or `None` when the gate is open. Shared by
/// Classify and ClassifyStream.
fn refusal(gate: Gate) -> Option<Forced> {
    match gate {
        Gate::Suspended => Some(Forced {
            action: Action::Block,
            level: 2,
            reason: "suspended",
            message: SUSPENDED_MESSAGE,
            retry_after_ms: 0,
        }),
        Gate::RateLimited { level, until_ms } => Some(Forced {
            action: Action::RateLimit,
            level,
            reason: "rate_limited",
            message: RATE_LIMITED_MESSAGE,
            retry_after_ms: until_ms.saturating_sub(now_ms()).max(1),
        }),
        Gate::Open { .. } => None,
    }
}

impl Forced {
    /// The final stream response that carries it (nothing past `released_bytes` may go out).
    fn stream_response(
        &self,
        log: StreamLog,
        level: u32,
        released_bytes: u64,
    ) -> pb::ClassifyStreamResponse {
        pb::ClassifyStreamResponse {
            action: action_to_pb(self.action) as i32,
            released_bytes,
            escalation_level: level,
            message: self.message.to_string(),
            decision_id: log.decision_id,
            r#final: true,
            reason: self.reason.to_string(),
            ruleset_version: log.ruleset_version,
            retry_after_ms: self.retry_after_ms,
            ..Default::default()
        }
    }
}

/// The answer for a subject over a per-subject limit or budget.
fn limited(retry_after_ms: u64, reason: &'static str) -> Forced {
    Forced {
        action: Action::RateLimit,
        level: 0,
        reason,
        message: if reason == "rate_limited" {
            LIMITED_MESSAGE
        } else {
            LIMITS_UNAVAILABLE_MESSAGE
        },
        retry_after_ms,
    }
}
