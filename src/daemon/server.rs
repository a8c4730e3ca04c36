//! Assembles and runs the gRPC server: the Guard service behind its limits and authentication,
//! health, reflection, the metrics endpoint, reload and the draining shutdown.

use super::config::Config;
use super::escalation::Escalation;
use super::ids::{DecisionIds, SubjectHasher};
use super::pb::guard_server::GuardServer;
use super::service::{GuardService, Shared};
use super::{metrics as m, pb};
use crate::engine::Engine;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::service::Interceptor;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

/// What the process (signals) or a test asks of a running daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Recompile the rulesets aside and swap them in (SIGHUP).
    Reload,
    /// Drain and stop (SIGTERM, SIGINT). Dropping every sender does the same.
    Shutdown,
}

/// The sockets the daemon serves on, bound by the caller (tests bind `127.0.0.1:0`).
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
}

/// Everything loaded from files before any port is bound.
pub struct Prepared {
    pub engine: Arc<Engine>,
    pub tokens: Option<Vec<Vec<u8>>>,
    pub subjects: SubjectHasher,
    pub tls: Option<Identity>,
}

/// Error of [`prepare`]: one line for the operator.
#[derive(Debug)]
pub struct PrepareError(pub String);

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PrepareError {}

/// Loads the rulesets, the token file, the subject key and the TLS identity named by `config`.
///
/// # Errors
/// A [`PrepareError`] naming the file and what is wrong with it (never the file's content).
pub fn prepare(config: &Config) -> Result<Prepared, PrepareError> {
    let engine = load_engine(config.rulesets.as_deref())
        .map_err(|e| PrepareError(format!("rulesets: {e}")))?;
    let tokens = match &config.auth_tokens_file {
        None => None,
        Some(p) => Some(read_tokens(p)?),
    };
    let subjects = match &config.subject_key_file {
        None => SubjectHasher::random().map_err(|e| PrepareError(format!("random source: {e}")))?,
        Some(p) => {
            let secret =
                std::fs::read(p).map_err(|e| PrepareError(format!("{}: {e}", p.display())))?;
            SubjectHasher::from_secret(trim_ascii(&secret)).ok_or_else(|| {
                PrepareError(format!(
                    "{}: the subject key must be at least 32 bytes",
                    p.display()
                ))
            })?
        }
    };
    let tls = match &config.tls {
        None => None,
        Some(files) => {
            let cert = std::fs::read(&files.cert)
                .map_err(|e| PrepareError(format!("{}: {e}", files.cert.display())))?;
            let key = std::fs::read(&files.key)
                .map_err(|e| PrepareError(format!("{}: {e}", files.key.display())))?;
            if !cert.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(PrepareError(format!(
                    "{}: not a PEM certificate",
                    files.cert.display()
                )));
            }
            if !key.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(PrepareError(format!(
                    "{}: not a PEM private key",
                    files.key.display()
                )));
            }
            Some(Identity::from_pem(cert, key))
        }
    };
    Ok(Prepared {
        engine,
        tokens,
        subjects,
        tls,
    })
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

fn read_tokens(path: &Path) -> Result<Vec<Vec<u8>>, PrepareError> {
    let text = std::fs::read(path).map_err(|e| PrepareError(format!("{}: {e}", path.display())))?;
    let tokens: Vec<Vec<u8>> = text
        .split(|b| *b == b'\n')
        .map(trim_ascii)
        .filter(|l| !l.is_empty() && !l.starts_with(b"#"))
        .map(<[u8]>::to_vec)
        .collect();
    if tokens.is_empty() {
        return Err(PrepareError(format!(
            "{}: no tokens (one a line; `#` starts a comment)",
            path.display()
        )));
    }
    if let Some(i) = tokens.iter().position(|t| t.len() < 16) {
        return Err(PrepareError(format!(
            "{}: token {} is shorter than 16 bytes",
            path.display(),
            i + 1
        )));
    }
    Ok(tokens)
}

/// Compiles the rulesets: the directory, or the bundled ones.
///
/// # Errors
/// The loader's error (file, line, reason).
pub fn load_engine(dir: Option<&Path>) -> Result<Arc<Engine>, crate::rules::LoadError> {
    let engine = match dir {
        Some(d) => Engine::from_dir(d)?,
        None => Engine::bundled()?,
    };
    Ok(Arc::new(engine))
}

/// Checks `authorization: Bearer <token>` against the configured tokens in constant time.
#[derive(Clone)]
struct BearerAuth {
    tokens: Option<Arc<Vec<Vec<u8>>>>,
}

impl Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(req);
        };
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        // Compare against every token so the time does not tell which one nearly matched.
        let mut ok = subtle::Choice::from(0u8);
        for t in tokens.iter() {
            ok |= t.as_slice().ct_eq(presented);
        }
        if bool::from(ok) && !presented.is_empty() {
            Ok(req)
        } else {
            metrics::counter!("mistguard_rejected_total", "reason" => "unauthenticated")
                .increment(1);
            Err(Status::unauthenticated("missing or unknown bearer token"))
        }
    }
}

/// Rewrites the decoder's statuses for a unary request the client got wrong: OUT_OF_RANGE for an
/// oversized message becomes RESOURCE_EXHAUSTED (what gRPC specifies for it), INTERNAL for a
/// message that does not decode (bad wire format, invalid UTF-8 in a string) becomes
/// INVALID_ARGUMENT, as on streams (whose task maps the same errors itself).
#[derive(Clone)]
struct ClientErrorStatus<S> {
    inner: S,
    limit: usize,
}

impl<S: NamedService> NamedService for ClientErrorStatus<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for ClientErrorStatus<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move {
            let mut resp = fut.await?;
            let headers = resp.headers_mut();
            let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
                && headers.get("grpc-message").is_some_and(|v| {
                    v.as_bytes()
                        .starts_with(b"Error,%20decoded%20message%20length%20too%20large")
                });
            let undecodable = headers.get("grpc-status").is_some_and(|v| v == "13")
                && headers.get("grpc-message").is_some_and(|v| {
                    let m = v.as_bytes();
                    m.starts_with(b"failed%20to%20decode") || m.windows(6).any(|w| w == b"decode")
                });
            let replacement = if too_large {
                metrics::counter!("mistguard_rejected_total", "reason" => "message_too_large")
                    .increment(1);
                Some(Status::resource_exhausted(format!(
                    "message larger than {limit} bytes (max_message_bytes)"
                )))
            } else if undecodable {
                metrics::counter!("mistguard_rejected_total", "reason" => "malformed").increment(1);
                Some(Status::invalid_argument(MALFORMED))
            } else {
                None
            };
            if let Some(status) = replacement {
                headers.remove("grpc-message");
                let _ = status.add_header(headers);
            }
            Ok(resp)
        })
    }
}

const MALFORMED: &str = "malformed message (invalid protobuf or UTF-8)";

/// Room for the metadata fields next to a text of `max_message_bytes`.
const ENVELOPE_BYTES: usize = 16 * 1024;

/// Runs the daemon on the given listeners until a [`Control::Shutdown`] arrives (or every sender
/// is dropped), then drains: health turns NOT_SERVING, new calls get UNAVAILABLE, open streams
/// get a final response, and the function returns at the latest `drain_deadline` later.
///
/// # Errors
/// When the server cannot be built (TLS configuration).
pub async fn serve_with(
    config: Config,
    prepared: Prepared,
    listeners: Listeners,
    mut control: mpsc::Receiver<Control>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let handle = m::install();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<GuardServer<GuardService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let limits = config.limits.clone();
    let version = prepared.engine.version().to_string();
    let shared = Arc::new(Shared {
        engine: ArcSwap::new(prepared.engine),
        limits: limits.clone(),
        escalation: Escalation::new(config.escalation.clone()),
        ids: DecisionIds::new()?,
        subjects: prepared.subjects,
        inflight: Arc::new(Semaphore::new(limits.max_inflight)),
        streams: Arc::new(Semaphore::new(limits.max_streams)),
        draining: AtomicBool::new(false),
        shutdown: shutdown_rx,
    });
    metrics::gauge!("mistguard_ruleset_info", "version" => version.clone()).set(1.0);
    metrics::gauge!("mistguard_active_streams").increment(0.0);

    let guard = GuardServer::new(GuardService::new(shared.clone()))
        .max_decoding_message_size(limits.max_message_bytes + ENVELOPE_BYTES);
    let guard = ClientErrorStatus {
        inner: guard,
        limit: limits.max_message_bytes,
    };
    let auth = BearerAuth {
        tokens: prepared.tokens.map(Arc::new),
    };
    let guard = tonic::service::interceptor::InterceptedService::new(guard, auth);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let mut builder = Server::builder();
    if let Some(identity) = prepared.tls {
        builder = builder.tls_config(ServerTlsConfig::new().identity(identity))?;
    }
    let grpc_addr = listeners.grpc.local_addr()?;
    // `Server::tcp_nodelay` applies only to listeners tonic binds itself; set it here, or Nagle's
    // algorithm and delayed ACKs add tens of milliseconds to small responses.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listeners.grpc),
        |conn| {
            conn.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = builder
        .tcp_nodelay(true)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
        .http2_max_local_error_reset_streams(limits.http2_max_local_error_reset_streams)
        .http2_max_pending_accept_reset_streams(Some(1024))
        .http2_max_header_list_size(16 * 1024)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(guard);
    // The rulesets are loaded (`prepare`): SERVING before the first connection is accepted, so a
    // client never sees NOT_SERVING from a daemon that is ready.
    health.set_serving::<GuardServer<GuardService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));

    let metrics_task = listeners.metrics.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(metrics_addr = %addr, "metrics listening on /metrics");
        }
        tokio::spawn(m::serve(l, handle))
    });
    let sweeper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                shared.escalation.sweep(std::time::Instant::now());
            }
        })
    };

    tracing::info!(addr = %grpc_addr, ruleset_version = %version, "mistguard serving");

    let mut current_version = version;
    let early_exit = loop {
        tokio::select! {
            c = control.recv() => match c {
                Some(Control::Reload) => {
                    reload(&shared, config.rulesets.clone(), &mut current_version).await;
                }
                Some(Control::Shutdown) | None => break None,
            },
            r = &mut server => break Some(r),
        }
    };
    if let Some(result) = early_exit {
        sweeper.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        return match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(e.into()),
        };
    }

    // Drain.
    let deadline = config.drain_deadline;
    tracing::info!(
        deadline_s = deadline.as_secs_f32(),
        "shutting down: draining"
    );
    shared.draining.store(true, Ordering::Release);
    health.set_not_serving::<GuardServer<GuardService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let drain_started = tokio::time::Instant::now();
    let _ = shutdown_tx.send(true);
    // Let open streams write their final response before tonic's graceful shutdown sends GOAWAY
    // (a client can see the GOAWAY before a final frame still queued on the connection): wait
    // until every stream task has ended (or half the deadline), then a moment for the frames.
    let grace = deadline / 2;
    while shared.streams.available_permits() < limits.max_streams && drain_started.elapsed() < grace
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50).min(grace)).await;
    let _ = stop_tx.send(());
    let left = deadline.saturating_sub(drain_started.elapsed());
    match tokio::time::timeout(left, &mut server).await {
        Ok(_) => tracing::info!("drained; exiting"),
        Err(_) => {
            let open = limits.max_streams - shared.streams.available_permits();
            tracing::warn!(
                open_streams = open,
                "drain deadline passed; closing remaining connections"
            );
            server.abort();
        }
    }
    sweeper.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    Ok(())
}

/// Compiles the rulesets aside and swaps them in; on failure the old ones keep serving.
async fn reload(shared: &Shared, dir: Option<PathBuf>, current_version: &mut String) {
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || load_engine(dir.as_deref())).await;
    match result {
        Ok(Ok(engine)) => {
            let version = engine.version().to_string();
            shared.engine.store(engine);
            metrics::counter!("mistguard_ruleset_reloads_total", "outcome" => "success")
                .increment(1);
            if version != *current_version {
                metrics::gauge!("mistguard_ruleset_info", "version" => current_version.clone())
                    .set(0.0);
            }
            metrics::gauge!("mistguard_ruleset_info", "version" => version.clone()).set(1.0);
            tracing::info!(ruleset_version = %version, millis = started.elapsed().as_millis() as u64, "rulesets reloaded");
            *current_version = version;
        }
        Ok(Err(e)) => {
            metrics::counter!("mistguard_ruleset_reloads_total", "outcome" => "failure")
                .increment(1);
            tracing::error!(error = %e, ruleset_version = %current_version, "ruleset reload failed; the previous rulesets keep serving");
        }
        Err(e) => {
            metrics::counter!("mistguard_ruleset_reloads_total", "outcome" => "failure")
                .increment(1);
            tracing::error!(error = %e, "ruleset reload panicked; the previous rulesets keep serving");
        }
    }
}

/// Binds the configured addresses.
///
/// # Errors
/// The address that could not be bound.
pub async fn bind(config: &Config) -> Result<Listeners, String> {
    let grpc = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let metrics = match config.metrics_listen {
        None => None,
        Some(addr) => Some(bind_metrics(addr).await?),
    };
    Ok(Listeners { grpc, metrics })
}

async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (metrics): {e}"))
}
