//! Prometheus metrics: the recorder, the names, and a minimal `/metrics` HTTP endpoint.
//!
//! Labels are low-cardinality by construction: RPC names, status codes, rule ids, trigger
//! languages, actions, reasons, outcomes, the ruleset version. Never a subject, never text.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
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
        "mistguard_bytes_scanned_total",
        "bytes of text scanned, by `rpc`",
    ),
    (
        "mistguard_ruleset_info",
        "1 for the ruleset `version` serving now, 0 for earlier ones",
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
    ("mistguard_escalation_alerts_total", "level-3 alerts raised"),
    (
        "mistguard_escalation_subjects",
        "subjects with escalation state in memory",
    ),
    (
        "mistguard_escalation_untracked_total",
        "hits whose subject was not tracked (state full)",
    ),
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder once per process (tests start several daemons in one
/// process; they share it) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("mistguard_request_duration_seconds".into()),
                    &[
                        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
                        0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0,
                    ],
                )
                .expect("non-empty buckets");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a host program's); ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            for (name, help) in METRICS {
                metrics::describe_counter!(*name, *help);
            }
            handle
        })
        .clone()
}

/// Serves `GET /metrics` on `listener` until the task is dropped. HTTP/1.1, one request per
/// connection; requests larger than 8 KiB or slower than 5 s are dropped.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let upkeep = handle.clone();
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
        let handle = handle.clone();
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
                let body = handle.render();
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
