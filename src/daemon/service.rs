//! The `mistguard.v1.Guard` service: requests in, the engine's verdicts out, with escalation,
//! limits, metrics and decision records around them.

use super::config::Limits;
use super::convert::{action_to_pb, direction_name, hit_to_pb, language_hint};
use super::escalation::{Escalation, Gate, Outcome};
use super::front::rejected;
use super::ids::{DecisionIds, SubjectHasher, SubjectKey};
use super::pb;
use crate::action::Action;
use crate::engine::{ClassifyOptions, Engine, Hit};
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

const MAX_SUBJECT_BYTES: usize = 1024;

/// State shared by every RPC.
pub struct Shared {
    /// The engine serving new requests; replaced whole on reload. A stream keeps the `Arc` it
    /// started with.
    pub engine: ArcSwap<Engine>,
    pub limits: Limits,
    pub escalation: Escalation,
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
struct Record<'a> {
    rpc: &'static str,
    decision_id: &'a str,
    meta: &'a CallMeta,
    action: Action,
    rules: &'a [&'a str],
    /// The language the engine settled on (as in the response); `None` when undecided.
    language: Option<&'a str>,
    level: u32,
    reason: &'a str,
    bytes: u64,
    /// The `version` of the rulesets that decided (the stream's own, across a reload).
    ruleset_version: &'a str,
    started: Instant,
}

/// Writes a decision record: metadata only. ALLOW decisions are DEBUG (a busy daemon makes
/// thousands a second, and `mistguard_decisions_total` counts them); every other action is INFO.
fn log_decision(r: &Record<'_>) {
    macro_rules! record {
        ($lvl:expr) => {{
            let subject = r.meta.subject.map(|s| s.short());
            tracing::event!(
                target: "mistguard::decision",
                $lvl,
                decision_id = r.decision_id,
                rpc = r.rpc,
                request_id = %r.meta.request_id,
                direction = r.meta.direction,
                subject_hash = subject.as_deref().unwrap_or(""),
                action = r.action.as_str(),
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
    if r.action == Action::Allow {
        record!(tracing::Level::DEBUG)
    } else {
        record!(tracing::Level::INFO)
    }
}

/// One WARN line, target `mistguard::escalation`, when a decision puts its subject at level 2.
fn log_escalation(meta: &CallMeta, decision_id: &str, outcome: &Outcome, suspension: Duration) {
    if outcome.suspended_now {
        let subject = meta.subject.map(|s| s.short());
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
}

impl StreamHits {
    fn add(&mut self, hits: &[Hit]) {
        for h in hits {
            if !self.rules.contains(&h.rule_id) {
                self.rules.push(h.rule_id.clone());
            }
            self.action = self.action.max(h.action);
        }
    }

    fn rules(&self) -> Vec<&str> {
        let mut rules: Vec<&str> = self.rules.iter().map(|r| &**r).collect();
        rules.sort_unstable();
        rules
    }
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

    fn gate(&self, subject: Option<&SubjectKey>) -> Gate {
        match subject {
            Some(s) => self.escalation.check(s, Instant::now()),
            None => Gate::Open { level: 0 },
        }
    }

    fn record(&self, subject: Option<&SubjectKey>, action: Action, rules: &[&str]) -> Outcome {
        match subject {
            Some(s) => self
                .escalation
                .record(s, action, rules.iter().copied(), Instant::now()),
            None => Outcome {
                level: u32::from(!rules.is_empty()),
                ..Outcome::default()
            },
        }
    }

    fn classify(
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
        let engine = self.engine.load_full();
        let forced = refusal(self.gate(meta.subject.as_ref()));
        if let Some((action, level, reason, message)) = forced {
            metrics::counter!("mistguard_rejected_total", "reason" => reason).increment(1);
            metrics::counter!("mistguard_decisions_total", "rpc" => "classify", "action" => action.as_str()).increment(1);
            log_decision(&Record {
                rpc: "classify",
                decision_id: &decision_id,
                meta: &meta,
                action,
                rules: &[],
                language: None,
                level,
                reason,
                bytes,
                ruleset_version: engine.version(),
                started,
            });
            return Ok(pb::ClassifyResponse {
                action: action_to_pb(action) as i32,
                escalation_level: level,
                message: message.to_string(),
                decision_id,
                reason: reason.to_string(),
                ruleset_version: engine.version().to_string(),
                ..Default::default()
            });
        }
        let verdict = engine.classify(&req.text, &meta.opts);
        drop(req);
        let rules = distinct_rules(&verdict.hits);
        let outcome = self.record(meta.subject.as_ref(), verdict.action, &rules);
        log_escalation(&meta, &decision_id, &outcome, self.escalation.suspension());
        observe_hits(&verdict.hits);
        metrics::counter!("mistguard_bytes_scanned_total", "rpc" => "classify").increment(bytes);
        metrics::counter!("mistguard_decisions_total", "rpc" => "classify", "action" => verdict.action.as_str())
            .increment(1);
        log_decision(&Record {
            rpc: "classify",
            decision_id: &decision_id,
            meta: &meta,
            action: verdict.action,
            rules: &rules,
            language: verdict.language,
            level: outcome.level,
            reason: "",
            bytes,
            ruleset_version: engine.version(),
            started,
        });
        Ok(pb::ClassifyResponse {
            action: action_to_pb(verdict.action) as i32,
            hits: verdict.hits.iter().map(hit_to_pb).collect(),
            language: verdict.language.unwrap_or("").to_string(),
            escalation_level: outcome.level,
            sanitized_text: verdict.sanitized_text,
            message: verdict.message.unwrap_or_default(),
            decision_id,
            reason: String::new(),
            ruleset_version: engine.version().to_string(),
        })
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
    End,
    Failed(Status),
    Idle,
    Shutdown,
    ClientGone,
}

impl StreamTask {
    async fn next(&mut self, shutdown: &mut watch::Receiver<bool>, idle: Duration) -> Next {
        if *shutdown.borrow() {
            return Next::Shutdown;
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => Next::Shutdown,
            _ = self.tx.closed() => Next::ClientGone,
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

        let first = match self.next(&mut shutdown, idle).await {
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
            hits: StreamHits::default(),
            language: None,
            level: 0,
            bytes: 0,
            started: self.started,
        };
        let forced = refusal(shared.gate(log.meta.subject.as_ref()));
        if let Some((action, level, reason, message)) = forced {
            metrics::counter!("mistguard_rejected_total", "reason" => reason).increment(1);
            metrics::counter!("mistguard_decisions_total", "rpc" => "classify_stream", "action" => action.as_str())
                .increment(1);
            log.level = level;
            log.end(Some(action), reason);
            self.send(Ok(pb::ClassifyStreamResponse {
                action: action_to_pb(action) as i32,
                escalation_level: level,
                message: message.to_string(),
                decision_id: log.decision_id,
                r#final: true,
                reason: reason.to_string(),
                ruleset_version: log.ruleset_version,
                ..Default::default()
            }))
            .await;
            return;
        }

        let mut session = engine.session(&log.meta.opts);
        // Each step's hits go to the client as they come: the session need not keep them.
        session.discard_verdict_hits();
        session.compose_released_text();
        let mut chunks: u64 = 0;
        let mut pending = Some(first);
        // What the client was last told it may forward.
        let mut released: u64 = 0;

        let (step, reason) = loop {
            let msg = match pending.take() {
                Some(m) => m,
                None => match self.next(&mut shutdown, idle).await {
                    Next::Message(m) => m,
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
                        log.end(None, "idle_timeout");
                        self.send(Err(status)).await;
                        return;
                    }
                    Next::ClientGone => {
                        log.end(None, "cancelled");
                        return;
                    }
                    Next::Failed(status) => {
                        let status = stream_decode_error(status, limits.max_message_bytes);
                        log.end(None, "malformed");
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
                log.end(None, reason);
                self.send(Err(reject(
                    "classify_stream",
                    reason,
                    Status::resource_exhausted(text),
                )))
                .await;
                return;
            }
            metrics::counter!("mistguard_stream_chunks_total").increment(1);
            metrics::counter!("mistguard_bytes_scanned_total", "rpc" => "classify_stream")
                .increment(msg.text.len() as u64);
            let step = session.feed(&msg.text);
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
            released = step.release_offset;
            let response = pb::ClassifyStreamResponse {
                action: action_to_pb(step.action) as i32,
                hits: step.hits.iter().map(hit_to_pb).collect(),
                released_bytes: released,
                released_text: step.released_text.unwrap_or_default(),
                language: step.language.unwrap_or("").to_string(),
                escalation_level: log.level,
                message: step.message.unwrap_or_default(),
                decision_id: log.decision_id.clone(),
                r#final: false,
                reason: String::new(),
                ruleset_version: log.ruleset_version.clone(),
            };
            if !self.send(Ok(response)).await {
                log.end(None, "cancelled");
                return;
            }
        };

        // The final response: the verdict of the whole stream.
        if reason != "blocked" && !step.hits.is_empty() {
            observe_hits(&step.hits);
            log.hits.add(&step.hits);
        }
        if step.language.is_some() {
            log.language = step.language;
        }
        let action = step.action;
        let outcome = shared.record(log.meta.subject.as_ref(), action, &log.hits.rules());
        log_escalation(
            &log.meta,
            &log.decision_id,
            &outcome,
            shared.escalation.suspension(),
        );
        metrics::counter!("mistguard_decisions_total", "rpc" => "classify_stream", "action" => action.as_str()).increment(1);
        log.level = outcome.level;
        log.end(Some(action), reason);
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
            reason: reason.to_string(),
            ruleset_version: log.ruleset_version,
        };
        self.send(Ok(response)).await;
    }

    async fn end_early(&mut self, next: Next) {
        match next {
            Next::Message(_) => unreachable!("handled by the caller"),
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
    started: Instant,
}

impl StreamLog {
    /// Writes the stream's one decision record; `action` defaults to the most severe hit's.
    fn end(&self, action: Option<Action>, reason: &str) {
        let rules = self.hits.rules();
        log_decision(&Record {
            rpc: "classify_stream",
            decision_id: &self.decision_id,
            meta: &self.meta,
            action: action.unwrap_or(self.hits.action),
            rules: &rules,
            language: self.language,
            level: self.level,
            reason,
            bytes: self.bytes,
            ruleset_version: &self.ruleset_version,
            started: self.started,
        });
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

/// The answer for a subject the escalation gate stops: (action, level, reason, message), or
/// `None` when the gate is open. Shared by Classify and ClassifyStream.
fn refusal(gate: Gate) -> Option<(Action, u32, &'static str, &'static str)> {
    match gate {
        Gate::Suspended => Some((Action::Block, 2, "suspended", SUSPENDED_MESSAGE)),
        Gate::RateLimited { level } => Some((
            Action::RateLimit,
            level,
            "rate_limited",
            RATE_LIMITED_MESSAGE,
        )),
        Gate::Open { .. } => None,
    }
}
