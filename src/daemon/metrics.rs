//! Prometheus metrics: the recorder, the names, and a minimal `/metrics` HTTP endpoint.
//!
//! Labels are low-cardinality by construction: RPC names, status codes, rule ids, trigger
//! languages, actions, reasons, outcomes, the ruleset version. Never a subject, never text.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Every metric the daemon exports, with its help text (also listed in `docs/DAEMON.md`).
pub const METRICS: &[(&str, &str)] = &[
    (
        "mistguard_requests_total",
        "RPCs answered, by `rpc` and gRPC `code`",
    ),
    (
        "mistguard_request_duration_seconds",
        "RPC latency histogram, by `rpc`",
    ),
    (
        "mistguard_stream_chunks_total",
        "ClassifyStream chunks scanned",
    ),
    (
        "mistguard_decisions_total",
        "decisions, by `rpc` and `action`",
    ),
    (
        "mistguard_hits_total",
        "rule hits, by `rule`, `language` and `action`",
    ),
    ("mistguard_active_streams", "ClassifyStream calls open now"),
    (
        "mistguard_protected_texts",
        "protected texts held now (ProtectText; expired ones until swept)",
    ),
    ("mistguard_protected_total", "texts protected (ProtectText calls answered OK)"),
    (
        "mistguard_tool_decisions_total",
        "AuthorizeToolCall decisions, by `tool` (up to 100 names, then `other`) and `decision`",
    ),
    (
        "mistguard_policy_errors_total",
        "policy `when` expressions that failed on a call (the rule did not match)",
    ),
    ("mistguard_approvals_pending", "tool-call approvals waiting for a decision"),
    (
        "mistguard_bytes_scanned_total",
        "bytes of text scanned, by `rpc`",
    ),
    (
        "mistguard_ruleset_info",
        "1 for the ruleset `version` serving now, 0 for earlier ones",
    ),
    (
        "mistguard_model_info",
        "1 for the learned-tier model `version` serving now, 0 for earlier ones (absent with `models = off`)",
    ),
    (
        "mistguard_ruleset_reloads_total",
        "ruleset reloads, by `outcome` (`success`, `failure`)",
    ),
    ("mistguard_rejected_total", "requests refused, by `reason`"),
    (
        "mistguard_escalation_level2_total",
        "subjects that reached level 2 (suspended)",
    ),
    (
        "mistguard_escalation_alerts_total",
        "level-3 alerts raised, by `cause` (`level2_subjects`, `novel_attack`)",
    ),
    (
        "mistguard_escalation_subjects",
        "subjects with escalation state in memory",
    ),
    (
        "mistguard_escalation_untracked_total",
        "hits whose subject was not tracked (state full)",
    ),
    (
        "mistguard_credentials_reloads_total",
        "reloads of the auth tokens and the TLS certificate, by `what` (`auth_tokens`, `tls`) and `outcome`",
    ),
    (
        "mistguard_log_write_errors_total",
        "log lines that could not be written (stderr closed or full); the call they belong to is answered all the same",
    ),
    (
        "mistguard_build_info",
        "1, with the daemon's `version`",
    ),
    (
        "mistguard_state_degraded",
        "1 while shared state (Redis) is configured but unreachable and local state answers; else 0",
    ),
    (
        "mistguard_state_redis_errors_total",
        "Redis calls that failed or timed out, by `op`",
    ),
    (
        "mistguard_state_errors_total",
        "local state that could not be kept (the suspensions file), by `op`",
    ),
    (
        "mistguard_state_merge_dropped_total",
        "changes made during a Redis outage that were too many to merge back (the oldest go; local state keeps them)",
    ),
    ("mistguard_review_queue", "subjects in the Level-2 review queue (local view)"),
    ("mistguard_suspensions_lifted_total", "suspensions lifted through the Admin service"),
    (
        "mistguard_limited_total",
        "requests refused by a per-subject limit or budget, by `reason` (`rate_limited`, `limits_unavailable`)",
    ),
    (
        "mistguard_records_written_total",
        "decision records written and synced, by `stream` (`decisions`, `reports`, `samples`)",
    ),
    (
        "mistguard_records_dropped_total",
        "records dropped because the queue was full (`records.durability = async`), by `stream`",
    ),
    (
        "mistguard_records_errors_total",
        "records that could not be written (disk full, read-only, I/O error), by `stream`",
    ),
    (
        "mistguard_records_fsync_seconds",
        "time of each group commit's fsync, by `stream`",
    ),
    (
        "mistguard_moderation_checks_total",
        "texts (and stream windows) sent to remote moderation, by `direction` (`input`, `output`) and `outcome` (`answered`, `cached`, `unavailable`)",
    ),
    (
        "mistguard_moderation_hits_total",
        "remote moderation categories that reached their thresholds, by `category` (unknown ones as `other`)",
    ),
    (
        "mistguard_moderation_fail_open_total",
        "answers given without the remote verdict (late or failed) where mapped rules failed open, by `direction`",
    ),
    (
        "mistguard_moderation_fail_closed_total",
        "answers given without the remote verdict where mapped rules failed closed (treated as hit), by `direction`",
    ),
    (
        "mistguard_moderation_novel_total",
        "remote hits on texts the local rules passed (novel attack vectors; they feed level 3), by `category`",
    ),
];

/// The RPCs of `mistguard.v1.Guard`, as metric labels.
pub const RPCS: &[&str] = &["classify", "classify_stream", "ping", "protect_text"];

/// Every `reason` of `mistguard_rejected_total`.
pub const REJECT_REASONS: &[&str] = &[
    "message_too_large",
    "stream_chunks",
    "stream_bytes",
    "idle_timeout",
    "overloaded",
    "draining",
    "unauthenticated",
    "invalid_argument",
    "malformed",
    "suspended",
    "rate_limited",
    "protected_id_unknown",
    "protected_set_full",
    "limits_unavailable",
    "records_unavailable",
];

/// What `/metrics` renders: the recorder's handle, and the process collector that is read at
/// each scrape.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
    process: Arc<metrics_process::Collector>,
}

impl Exporter {
    /// The metrics in the Prometheus text format, the process metrics read now.
    pub fn render(&self) -> String {
        self.process.collect();
        self.handle.render()
    }
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Installs the global Prometheus recorder once per process (tests start several daemons in one
/// process; they share it) and returns the exporter.
pub fn install() -> Exporter {
    EXPORTER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("mistguard_request_duration_seconds".into()),
                    &[
                        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
                        0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0,
                    ],
                )
                .expect("non-empty buckets")
                .set_buckets_for_metric(
                    Matcher::Full("mistguard_moderation_request_seconds".into()),
                    &[0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0],
                )
                .expect("non-empty buckets")
                .set_buckets_for_metric(
                    Matcher::Full("mistguard_moderation_batch_size".into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
                )
                .expect("non-empty buckets");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a host program's); ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            for (name, help) in METRICS.iter().chain(crate::io::moderation::METRICS) {
                metrics::describe_counter!(*name, *help);
            }
            // CPU, memory, file descriptors, threads, start time: `mistguard_process_*`.
            let process = metrics_process::Collector::new("mistguard_");
            process.describe();
            Exporter {
                handle,
                process: Arc::new(process),
            }
        })
        .clone()
}

/// Creates every series the daemon can report whose labels are known at start, at zero, so a
/// dashboard or an alert sees them before their first event (a rate over a series that does not
/// exist yet is no data, not zero).
pub fn register(engine: &crate::engine::Engine) {
    use crate::action::Action;
    metrics::gauge!("mistguard_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for rpc in RPCS {
        metrics::counter!("mistguard_requests_total", "rpc" => *rpc, "code" => "ok").increment(0);
        // A histogram appears with its first sample; the buckets of each RPC exist from here.
        let _ = metrics::histogram!("mistguard_request_duration_seconds", "rpc" => *rpc);
    }
    for rpc in ["classify", "classify_stream"] {
        metrics::counter!("mistguard_bytes_scanned_total", "rpc" => rpc).increment(0);
        for action in Action::ALL {
            metrics::counter!("mistguard_decisions_total", "rpc" => rpc, "action" => action.as_str())
                .increment(0);
        }
    }
    metrics::counter!("mistguard_stream_chunks_total").increment(0);
    metrics::gauge!("mistguard_active_streams").increment(0.0);
    for outcome in ["success", "failure"] {
        metrics::counter!("mistguard_ruleset_reloads_total", "outcome" => outcome).increment(0);
        for what in ["auth_tokens", "tls", "policies", "admin_tokens"] {
            metrics::counter!("mistguard_credentials_reloads_total", "what" => what, "outcome" => outcome)
                .increment(0);
        }
    }
    for reason in REJECT_REASONS {
        metrics::counter!("mistguard_rejected_total", "reason" => *reason).increment(0);
    }
    metrics::counter!("mistguard_escalation_level2_total").increment(0);
    for cause in ["level2_subjects", "novel_attack"] {
        metrics::counter!("mistguard_escalation_alerts_total", "level" => "3", "cause" => cause)
            .increment(0);
    }
    metrics::gauge!("mistguard_escalation_subjects").increment(0.0);
    metrics::counter!("mistguard_escalation_untracked_total").increment(0);
    metrics::counter!("mistguard_log_write_errors_total").increment(0);
    metrics::gauge!("mistguard_protected_texts").set(0.0);
    metrics::counter!("mistguard_protected_total").increment(0);
    metrics::counter!("mistguard_policy_errors_total").increment(0);
    metrics::gauge!("mistguard_approvals_pending").set(0.0);
    metrics::gauge!("mistguard_state_degraded").set(0.0);
    metrics::gauge!("mistguard_review_queue").set(0.0);
    metrics::counter!("mistguard_suspensions_lifted_total").increment(0);
    metrics::counter!("mistguard_state_merge_dropped_total").increment(0);
    for reason in ["rate_limited", "limits_unavailable"] {
        metrics::counter!("mistguard_limited_total", "reason" => reason).increment(0);
    }
    for op in [
        "ping",
        "check",
        "record",
        "merge_suspension",
        "merge_rate_limit",
        "reviews",
        "lift",
        "limit",
    ] {
        metrics::counter!("mistguard_state_redis_errors_total", "op" => op).increment(0);
    }
    metrics::counter!("mistguard_state_errors_total", "op" => "persist").increment(0);
    for stream in ["decisions", "reports", "samples", "novel"] {
        // A histogram appears with its first sample; its series exist from here.
        let _ = metrics::histogram!("mistguard_records_fsync_seconds", "stream" => stream);
        metrics::counter!("mistguard_records_written_total", "stream" => stream).increment(0);
        metrics::counter!("mistguard_records_dropped_total", "stream" => stream).increment(0);
        metrics::counter!("mistguard_records_errors_total", "stream" => stream).increment(0);
    }
    for decision in ["allow", "deny", "require_approval"] {
        metrics::counter!("mistguard_tool_decisions_total", "tool" => "other", "decision" => decision)
            .increment(0);
    }
    register_moderation();
    register_hits(engine);
}

/// The remote moderation series (at zero even while it is off: a dashboard shows zeros).
fn register_moderation() {
    use crate::io::moderation::FailureKind as K;
    for direction in ["input", "output"] {
        for outcome in ["answered", "cached", "unavailable"] {
            metrics::counter!("mistguard_moderation_checks_total", "direction" => direction, "outcome" => outcome)
                .increment(0);
        }
        metrics::counter!("mistguard_moderation_fail_open_total", "direction" => direction)
            .increment(0);
        metrics::counter!("mistguard_moderation_fail_closed_total", "direction" => direction)
            .increment(0);
    }
    metrics::counter!("mistguard_moderation_hits_total", "category" => "other").increment(0);
    metrics::counter!("mistguard_moderation_novel_total", "category" => "other").increment(0);
    for endpoint in ["moderations", "chat"] {
        metrics::counter!("mistguard_moderation_requests_total", "endpoint" => endpoint, "status" => "200")
            .increment(0);
        let _ = metrics::histogram!("mistguard_moderation_request_seconds", "endpoint" => endpoint);
    }
    for kind in [
        K::Timeout,
        K::Network,
        K::RateLimited,
        K::Server,
        K::Auth,
        K::Rejected,
        K::Malformed,
        K::BreakerOpen,
        K::Budget,
        K::ClientLimit,
        K::NoKeys,
    ] {
        metrics::counter!("mistguard_moderation_errors_total", "kind" => kind.as_str())
            .increment(0);
    }
    for outcome in ["done", "refused"] {
        metrics::counter!("mistguard_moderation_retries_total", "outcome" => outcome).increment(0);
    }
    metrics::gauge!("mistguard_moderation_breaker_state").set(0.0);
    for to in ["closed", "open", "half_open"] {
        metrics::counter!("mistguard_moderation_breaker_transitions_total", "to" => to)
            .increment(0);
    }
    metrics::counter!("mistguard_moderation_cache_hits_total").increment(0);
    metrics::counter!("mistguard_moderation_cache_misses_total").increment(0);
    let _ = metrics::histogram!("mistguard_moderation_batch_size");
    metrics::gauge!("mistguard_moderation_batch_limit").increment(0.0);
    metrics::counter!("mistguard_moderation_tokens_total").increment(0);
    for scope in ["total", "subject"] {
        metrics::gauge!("mistguard_moderation_budget_tokens", "scope" => scope).increment(0.0);
        metrics::counter!("mistguard_moderation_budget_refused_total", "scope" => scope)
            .increment(0);
    }
    for state in ["usable", "benched"] {
        metrics::gauge!("mistguard_moderation_keys", "state" => state).increment(0.0);
    }
    metrics::gauge!("mistguard_moderation_auth_outage").increment(0.0);
}

/// `mistguard_hits_total` for every (rule, trigger language) the rulesets hold, with the rule's
/// action: the series a hit can create. Called again after a reload.
pub fn register_hits(engine: &crate::engine::Engine) {
    let rules = engine.ruleset();
    for (rule, langs) in crate::rules::pattern_counts(rules) {
        let Some(info) = rules.rules.iter().find(|r| *r.id == *rule) else {
            continue;
        };
        for lang in langs.keys() {
            metrics::counter!(
                "mistguard_hits_total",
                "rule" => rule.clone(),
                "language" => *lang,
                "action" => info.action.as_str()
            )
            .increment(0);
        }
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped. HTTP/1.1, one request per
/// connection; requests larger than 8 KiB or slower than 5 s are dropped.
pub async fn serve(listener: TcpListener, exporter: Exporter) {
    let upkeep = exporter.handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    let n = sock.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
            let response = if line.starts_with(b"GET /metrics ")
                || line.starts_with(b"GET /metrics?")
            {
                let body = exporter.render();
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// `mistguard_model_info`: the model serving now at 1, the one before at 0.
pub fn set_model_info(old: Option<&str>, new: Option<&str>) {
    if let Some(old) = old.filter(|o| Some(*o) != new) {
        metrics::gauge!("mistguard_model_info", "version" => old.to_string()).set(0.0);
    }
    if let Some(new) = new {
        metrics::gauge!("mistguard_model_info", "version" => new.to_string()).set(1.0);
    }
}
