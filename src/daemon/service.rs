//! The `mistguard.v1.Guard` service: requests in, the engine's verdicts out, with escalation,
//! limits, metrics and decision records around them.

use super::config::Limits;
use super::convert::{action_to_pb, direction_name, hit_to_pb, language_hint};
use super::escalation::{Escalation, Gate, Outcome};
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

fn reject(reason: &'static str, status: Status) -> Status {
    metrics::counter!("mistguard_rejected_total", "reason" => reason).increment(1);
    tracing::debug!(reason, code = ?status.code(), "request rejected");
    status
}

fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

fn observe_rpc(rpc: &'static str, code: Code, started: Instant) {
    metrics::counter!("mistguard_requests_total", "rpc" => rpc, "code" => code_label(code))
        .increment(1);
    metrics::histogram!("mistguard_request_duration_seconds", "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
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
fn loggable_request_id(id: &str) -> &str {
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

impl CallMeta {
    fn parse(
        subject: &str,
        language: &str,
        direction: i32,
        request_id: &str,
        hasher: &SubjectHasher,
    ) -> Result<CallMeta, Status> {
        if subject.len() > MAX_SUBJECT_BYTES {
            return Err(reject(
                "invalid_argument",
                Status::invalid_argument("subject is longer than 1024 bytes"),
            ));
        }
        let lang_hint = language_hint(language)
            .map_err(|m| reject("invalid_argument", Status::invalid_argument(m)))?;
        Ok(CallMeta {
            subject: (!subject.is_empty()).then(|| hasher.hash(subject)),
            opts: ClassifyOptions { lang_hint },
            direction: direction_name(direction),
            request_id: loggable_request_id(request_id).to_string(),
        })
    }
}

/// One decision record: metadata only. ALLOW decisions are DEBUG (a busy daemon makes thousands
/// a second, and `mistguard_decisions_total` counts them); every other action is INFO.
#[allow(clippy::too_many_arguments)]
fn log_decision(
    rpc: &'static str,
    decision_id: &str,
    meta: &CallMeta,
    action: Action,
    rules: &[&str],
    language: Option<&str>,
    level: u32,
    reason: &str,
    bytes: u64,
    started: Instant,
) {
    macro_rules! record {
        ($lvl:expr) => {{
            let subject = meta.subject.map(|s| s.short());
            tracing::event!(
                target: "mistguard::decision",
                $lvl,
                decision_id,
                rpc,
                request_id = %meta.request_id,
                direction = meta.direction,
                subject_hash = subject.as_deref().unwrap_or(""),
                action = action.as_str(),
                rules = %rules.join(","),
                language = language.unwrap_or(""),
                escalation_level = level,
                reason,
                bytes,
                micros = started.elapsed().as_micros() as u64,
                "decision"
            )
        }};
    }
    if action == Action::Allow {
        record!(tracing::Level::DEBUG)
    } else {
        record!(tracing::Level::INFO)
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
    fn admit(&self) -> Result<(), Status> {
        if self.draining.load(Ordering::Acquire) {
            return Err(reject(
                "draining",
                Status::unavailable("mistguard is shutting down"),
            ));
        }
        Ok(())
    }

    fn check_size(&self, len: usize) -> Result<(), Status> {
        if len > self.limits.max_message_bytes {
            return Err(reject(
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
        self.admit()?;
        let Ok(_permit) = self.inflight.try_acquire() else {
            return Err(reject(
                "overloaded",
                Status::resource_exhausted("mistguard is overloaded; retry later"),
            ));
        };
        self.check_size(req.text.len())?;
        let meta = CallMeta::parse(
            &req.subject,
            &req.language,
            req.direction,
            &req.request_id,
            &self.subjects,
        )?;
        let decision_id = self.ids.next();
        let bytes = req.text.len() as u64;
        let forced = refusal(self.gate(meta.subject.as_ref()));
        if let Some((action, level, reason, message)) = forced {
            metrics::counter!("mistguard_rejected_total", "reason" => reason).increment(1);
            metrics::counter!("mistguard_decisions_total", "rpc" => "classify", "action" => action.as_str()).increment(1);
            log_decision(
                "classify",
                &decision_id,
                &meta,
                action,
                &[],
                None,
                level,
                reason,
                bytes,
                started,
            );
            return Ok(pb::ClassifyResponse {
                action: action_to_pb(action) as i32,
                escalation_level: level,
                message: message.to_string(),
                decision_id,
                reason: reason.to_string(),
                ..Default::default()
            });
        }
        let engine = self.engine.load_full();
        let verdict = engine.classify(&req.text, &meta.opts);
        drop(req);
        let rules = distinct_rules(&verdict.hits);
        let outcome = self.record(meta.subject.as_ref(), verdict.action, &rules);
        observe_hits(&verdict.hits);
        metrics::counter!("mistguard_bytes_scanned_total", "rpc" => "classify").increment(bytes);
        metrics::counter!("mistguard_decisions_total", "rpc" => "classify", "action" => verdict.action.as_str())
            .increment(1);
        log_decision(
            "classify",
            &decision_id,
            &meta,
            verdict.action,
            &rules,
            verdict.language,
            outcome.level,
            "",
            bytes,
            started,
        );
        Ok(pb::ClassifyResponse {
            action: action_to_pb(verdict.action) as i32,
            hits: verdict.hits.iter().map(hit_to_pb).collect(),
            language: verdict.language.unwrap_or("").to_string(),
            escalation_level: outcome.level,
            sanitized_text: verdict.sanitized_text,
            message: verdict.message.unwrap_or_default(),
            decision_id,
            reason: String::new(),
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
        let result = self.shared.classify(req.into_inner(), started);
        observe_rpc(
            "classify",
            result.as_ref().err().map_or(Code::Ok, |s| s.code()),
            started,
        );
        result.map(Response::new)
    }

    type ClassifyStreamStream = ResponseStream;

    async fn classify_stream(
        &self,
        req: Request<Streaming<pb::ClassifyStreamRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        let started = Instant::now();
        let admitted = self.shared.admit().and_then(|()| {
            self.shared
                .streams
                .clone()
                .try_acquire_owned()
                .map_err(|_| {
                    reject(
                        "overloaded",
                        Status::resource_exhausted("too many open streams; retry later"),
                    )
                })
        });
        let permit = match admitted {
            Ok(p) => p,
            Err(status) => {
                observe_rpc("classify_stream", status.code(), started);
                return Err(status);
            }
        };
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
        let started = Instant::now();
        let result = self.shared.admit();
        observe_rpc(
            "ping",
            result.as_ref().err().map_or(Code::Ok, |s| s.code()),
            started,
        );
        result.map(|()| Response::new(pb::PingResponse {}))
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
        let code = self.run_inner().await;
        observe_rpc("classify_stream", code, self.started);
    }

    /// Returns the status code the call ended with.
    async fn run_inner(&mut self) -> Code {
        let shared = self.shared.clone();
        let limits = &shared.limits;
        let mut shutdown = shared.shutdown.clone();
        let idle = limits.stream_idle_timeout;

        let first = match self.next(&mut shutdown, idle).await {
            Next::Message(m) => m,
            other => return self.end_early(other).await,
        };
        let meta = match CallMeta::parse(
            &first.subject,
            &first.language,
            first.direction,
            &first.request_id,
            &shared.subjects,
        ) {
            Ok(m) => m,
            Err(status) => {
                let code = status.code();
                self.send(Err(status)).await;
                return code;
            }
        };
        let decision_id = shared.ids.next();
        let forced = refusal(shared.gate(meta.subject.as_ref()));
        if let Some((action, level, reason, message)) = forced {
            metrics::counter!("mistguard_rejected_total", "reason" => reason).increment(1);
            metrics::counter!("mistguard_decisions_total", "rpc" => "classify_stream", "action" => action.as_str())
                .increment(1);
            log_decision(
                "classify_stream",
                &decision_id,
                &meta,
                action,
                &[],
                None,
                level,
                reason,
                0,
                self.started,
            );
            self.send(Ok(pb::ClassifyStreamResponse {
                action: action_to_pb(action) as i32,
                escalation_level: level,
                message: message.to_string(),
                decision_id,
                r#final: true,
                reason: reason.to_string(),
                ..Default::default()
            }))
            .await;
            return Code::Ok;
        }

        // The stream keeps this engine to its end, even across a reload.
        let engine = shared.engine.load_full();
        let mut session = engine.session(&meta.opts);
        // Each step's hits go to the client as they come: the session need not keep them.
        session.discard_verdict_hits();
        let mut all_hits = StreamHits::default();
        let mut chunks: u64 = 0;
        let mut bytes: u64 = 0;
        let mut pending = Some(first);
        let mut level = 0;
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
                            "idle_timeout",
                            Status::deadline_exceeded(format!(
                                "stream idle for more than {}s",
                                idle.as_secs_f32()
                            )),
                        );
                        self.log_stream_end(
                            &decision_id,
                            &meta,
                            &all_hits,
                            None,
                            level,
                            "idle_timeout",
                            bytes,
                        );
                        self.send(Err(status)).await;
                        return Code::DeadlineExceeded;
                    }
                    Next::ClientGone => {
                        self.log_stream_end(
                            &decision_id,
                            &meta,
                            &all_hits,
                            None,
                            level,
                            "cancelled",
                            bytes,
                        );
                        return Code::Cancelled;
                    }
                    Next::Failed(status) => {
                        let status = stream_decode_error(status, limits.max_message_bytes);
                        self.log_stream_end(
                            &decision_id,
                            &meta,
                            &all_hits,
                            None,
                            level,
                            "malformed",
                            bytes,
                        );
                        let code = status.code();
                        self.send(Err(status)).await;
                        return code;
                    }
                },
            };
            chunks += 1;
            bytes += msg.text.len() as u64;
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
            } else if bytes > limits.stream_max_bytes {
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
                self.log_stream_end(&decision_id, &meta, &all_hits, None, level, reason, bytes);
                self.send(Err(reject(reason, Status::resource_exhausted(text))))
                    .await;
                return Code::ResourceExhausted;
            }
            metrics::counter!("mistguard_stream_chunks_total").increment(1);
            metrics::counter!("mistguard_bytes_scanned_total", "rpc" => "classify_stream")
                .increment(msg.text.len() as u64);
            let step = session.feed(&msg.text);
            drop(msg);
            if !step.hits.is_empty() {
                observe_hits(&step.hits);
                all_hits.add(&step.hits);
                level = level.max(1);
            }
            if step.action >= Action::Block {
                break (step, "blocked");
            }
            released = step.release_offset;
            let response = pb::ClassifyStreamResponse {
                action: action_to_pb(step.action) as i32,
                hits: step.hits.iter().map(hit_to_pb).collect(),
                released_bytes: released,
                language: step.language.unwrap_or("").to_string(),
                escalation_level: level,
                message: step.message.unwrap_or_default(),
                decision_id: decision_id.clone(),
                r#final: false,
                reason: String::new(),
            };
            if !self.send(Ok(response)).await {
                self.log_stream_end(
                    &decision_id,
                    &meta,
                    &all_hits,
                    None,
                    level,
                    "cancelled",
                    bytes,
                );
                return Code::Cancelled;
            }
        };

        // The final response: the verdict of the whole stream.
        if reason != "blocked" && !step.hits.is_empty() {
            observe_hits(&step.hits);
            all_hits.add(&step.hits);
        }
        let action = step.action;
        let rules = all_hits.rules();
        let outcome = shared.record(meta.subject.as_ref(), action, &rules);
        metrics::counter!("mistguard_decisions_total", "rpc" => "classify_stream", "action" => action.as_str()).increment(1);
        self.log_stream_end(
            &decision_id,
            &meta,
            &all_hits,
            Some(action),
            outcome.level,
            reason,
            bytes,
        );
        // The engine releases past a hit once it is reported (the client can act on its span);
        // after a block nothing more may be forwarded, so the release stays where it was.
        let released_bytes = if action >= Action::Block {
            released
        } else {
            step.release_offset
        };
        let response = pb::ClassifyStreamResponse {
            action: action_to_pb(action) as i32,
            hits: step.hits.iter().map(hit_to_pb).collect(),
            released_bytes,
            language: step.language.unwrap_or("").to_string(),
            escalation_level: outcome.level,
            message: step.message.unwrap_or_default(),
            decision_id,
            r#final: true,
            reason: reason.to_string(),
        };
        if self.send(Ok(response)).await {
            Code::Ok
        } else {
            Code::Cancelled
        }
    }

    async fn end_early(&mut self, next: Next) -> Code {
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
                    ..Default::default()
                }))
                .await;
                Code::Ok
            }
            Next::Idle => {
                let idle = self.shared.limits.stream_idle_timeout;
                self.send(Err(reject(
                    "idle_timeout",
                    Status::deadline_exceeded(format!(
                        "stream idle for more than {}s",
                        idle.as_secs_f32()
                    )),
                )))
                .await;
                Code::DeadlineExceeded
            }
            Next::ClientGone => Code::Cancelled,
            Next::Failed(status) => {
                let status = stream_decode_error(status, self.shared.limits.max_message_bytes);
                let code = status.code();
                self.send(Err(status)).await;
                code
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn log_stream_end(
        &self,
        decision_id: &str,
        meta: &CallMeta,
        hits: &StreamHits,
        action: Option<Action>,
        level: u32,
        reason: &str,
        bytes: u64,
    ) {
        let rules = hits.rules();
        let action = action.unwrap_or(hits.action);
        log_decision(
            "classify_stream",
            decision_id,
            meta,
            action,
            &rules,
            None,
            level,
            reason,
            bytes,
            self.started,
        );
    }
}

/// Maps an error reading the request stream: an oversized message becomes RESOURCE_EXHAUSTED;
/// a message that does not decode (invalid UTF-8 in a string, bad wire format) INVALID_ARGUMENT.
/// The decoder's text never holds request content, but it is replaced anyway.
fn stream_decode_error(status: Status, limit: usize) -> Status {
    match status.code() {
        Code::OutOfRange => reject(
            "message_too_large",
            Status::resource_exhausted(format!(
                "message larger than {limit} bytes (max_message_bytes)"
            )),
        ),
        Code::Internal if status.message().contains("decode") => reject(
            "malformed",
            Status::invalid_argument("malformed message (invalid protobuf or UTF-8)"),
        ),
        Code::Cancelled => status,
        _ => reject("malformed", status),
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
