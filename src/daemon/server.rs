//! Assembles and runs the gRPC server: the Guard service behind its limits and authentication,
//! health, reflection, the metrics endpoint, reload and the draining shutdown.

use super::config::Config;
use super::front::{Front, Tokens};
use super::ids::{DecisionIds, SubjectHasher};
use super::pb::guard_server::GuardServer;
use super::service::{GuardService, Shared};
use super::tls::{self, CertResolver};
use super::{metrics as m, pb};
use crate::engine::Engine;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::rustls::sign::CertifiedKey;
use tonic::transport::Server;

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
    /// The review console (`console_listen`); `None`: off.
    pub console: Option<TcpListener>,
}

/// Everything loaded from files before any port is bound.
pub struct Prepared {
    pub engine: Arc<Engine>,
    pub tokens: Option<Vec<Vec<u8>>>,
    pub subjects: SubjectHasher,
    /// The certificate chain and key, checked (PEM, usable key, key matching the certificate).
    pub tls: Option<Arc<CertifiedKey>>,
    /// The tool-call policies (empty without `policies`).
    pub policies: crate::policy::PolicySet,
    /// Where approvals live: Redis (`redis.url`), else `data_dir/approvals.redb`, else memory.
    pub approvals: Box<dyn super::approvals::ApprovalStore>,
    /// The admin tokens (`admin_tokens_file`).
    pub admin_tokens: Option<Vec<(Vec<u8>, super::approvals::Approver)>>,
}

/// The file of the approvals store in `data_dir`.
pub const APPROVALS_FILE: &str = "approvals.redb";
/// The key of the keyed hashes (subjects, calls, canaries) in `data_dir` when no
/// `subject_key_file` is set: created on first start (64 hex digits, mode 0600).
pub const KEY_FILE: &str = "subject.key";

/// The key kept in `data_dir`, created on first start.
fn data_dir_key(dir: &Path) -> Result<Vec<u8>, PrepareError> {
    let path = dir.join(KEY_FILE);
    let err = |e: std::io::Error| PrepareError(format!("{}: {e}", path.display()));
    match std::fs::read(&path) {
        Ok(b) => {
            let b = trim_ascii(&b).to_vec();
            if b.len() < 32 {
                return Err(PrepareError(format!(
                    "{}: the key must be at least 32 bytes",
                    path.display()
                )));
            }
            Ok(b)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !dir.is_dir() {
                return Err(PrepareError(format!(
                    "data_dir {}: not a directory (create it, writable by the daemon)",
                    dir.display()
                )));
            }
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).map_err(|e| PrepareError(format!("random source: {e}")))?;
            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(err)?;
            f.write_all(hex.as_bytes()).map_err(err)?;
            f.sync_all().map_err(err)?;
            Ok(hex.into_bytes())
        }
        Err(e) => Err(err(e)),
    }
}

fn load_policies(dir: Option<&Path>) -> Result<crate::policy::PolicySet, PrepareError> {
    match dir {
        None => Ok(crate::policy::PolicySet::empty()),
        Some(d) => crate::load::policy_dir(d).map_err(|e| PrepareError(format!("policies: {e}"))),
    }
}

fn read_admin_tokens(
    path: &Path,
) -> Result<Vec<(Vec<u8>, super::approvals::Approver)>, PrepareError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PrepareError(format!("{}: {e}", path.display())))?;
    super::approvals::parse_admin_tokens(&text)
        .map_err(|e| PrepareError(format!("{}: {e}", path.display())))
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
    let engine = load_engine(config.rulesets.as_deref(), &config.models)
        .map_err(|e| PrepareError(format!("rulesets: {e}")))?;
    let tokens = match &config.auth_tokens_file {
        None => None,
        Some(p) => Some(read_tokens(p)?),
    };
    let subjects = match (&config.subject_key_file, &config.tools.data_dir) {
        // With a data directory, the key lives there: subject hashes, approvals' bindings and
        // canaries stay valid across restarts.
        (None, Some(d)) => SubjectHasher::from_secret(&data_dir_key(d)?)
            .ok_or_else(|| PrepareError("data_dir key: too short".into()))?,
        (None, None) => {
            SubjectHasher::random().map_err(|e| PrepareError(format!("random source: {e}")))?
        }
        (Some(p), _) => {
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
        Some(files) => Some(tls::load(files).map_err(PrepareError)?),
    };
    let policies = load_policies(config.tools.policies.as_deref())?;
    let approvals: Box<dyn super::approvals::ApprovalStore> =
        match (&config.redis.url, &config.tools.data_dir) {
            // Shared by the replicas: an approval given on one is usable (once) on any.
            (Some(url), _) => Box::new(
                super::approvals_redis::RedisApprovalStore::new(
                    url,
                    config.redis.timeout,
                    &config.redis.prefix,
                )
                .map_err(|e| PrepareError(format!("approvals: {e}")))?,
            ),
            (None, None) => Box::new(super::approvals::MemoryStore::new()),
            (None, Some(d)) => {
                if !d.is_dir() {
                    return Err(PrepareError(format!(
                        "data_dir {}: not a directory (create it, writable by the daemon)",
                        d.display()
                    )));
                }
                Box::new(
                    super::approvals::RedbStore::open(&d.join(APPROVALS_FILE))
                        .map_err(|e| PrepareError(format!("approvals: {e}")))?,
                )
            }
        };
    let admin_tokens = match &config.tools.admin_tokens_file {
        None => None,
        Some(p) => Some(read_admin_tokens(p)?),
    };
    if config.moderation.enabled() {
        let unknown = config.moderation.mapping.unknown_rules(engine.ruleset());
        if !unknown.is_empty() {
            return Err(PrepareError(format!(
                "moderation.categories: the rulesets define no rule {} (a category maps to a rule id of the rulesets, or to `flag`)",
                unknown.join(", ")
            )));
        }
    }
    Ok(Prepared {
        engine,
        tokens,
        subjects,
        tls,
        policies,
        approvals,
        admin_tokens,
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

/// Compiles the rulesets (the directory, or the bundled ones) with the learned tier's model.
///
/// # Errors
/// The loader's error (file, line, reason).
pub fn load_engine(
    dir: Option<&Path>,
    models: &crate::load::Models,
) -> Result<Arc<Engine>, crate::rules::LoadError> {
    crate::load::engine(dir, models).map(Arc::new)
}

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
    let exporter = m::install();
    m::register(&prepared.engine);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<GuardServer<GuardService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let limits = config.limits.clone();
    let version = prepared.engine.version().to_string();
    // Derived from the subject key: stable across restarts when `subject_key_file` is set, so
    // canaries and hashed placeholders stay recognisable.
    let leak_key = crate::leak::LeakKey::new(prepared.subjects.derive("mistguard leak v1"));
    let placeholder_key =
        crate::leak::LeakKey::new(prepared.subjects.derive("mistguard placeholder v1"));
    let tools = super::tools::Tools::new(
        prepared.policies,
        prepared.approvals,
        if config.tools.default_deny {
            crate::policy::ToolAction::Deny
        } else {
            crate::policy::ToolAction::Allow
        },
        config.tools.approval_ttl,
        prepared.subjects.derive("mistguard call hash v1"),
    );
    tools.observe_pending();
    let state = super::state::State::new(
        config.escalation.clone(),
        config.tools.data_dir.as_deref(),
        &config.redis,
        &config.subject_limits,
    )
    .map_err(PrepareError)?;
    if state.has_redis() {
        match state.probe(config.redis.required).await {
            Ok(()) => tracing::info!(target: "mistguard::state", "shared state: Redis answers"),
            Err(e) if config.redis.required => {
                return Err(PrepareError(format!(
                    "redis.url: Redis did not answer ({e}); redis.required = true stops the start"
                ))
                .into());
            }
            // `probe` logged the one line and marked the daemon degraded.
            Err(_) => {}
        }
    }
    let records = match &config.records.dir {
        None => None,
        Some(dir) => Some(
            super::recorder::Recorder::open(
                &config.records,
                dir,
                prepared.subjects.derive("mistguard record text v1"),
            )
            .map_err(PrepareError)?,
        ),
    };
    let moderation = if config.moderation.enabled() {
        let client = crate::io::moderation::Moderator::new(config.moderation.client.clone())
            .map_err(|e| PrepareError(format!("moderation: {e}")))?;
        let (usable, loaded) = client.keys();
        tracing::info!(
            target: "mistguard::moderation",
            model = %config.moderation.client.model,
            input = config.moderation.input.as_str(),
            output = config.moderation.output.as_str(),
            deadline_ms = config.moderation.deadline.as_millis() as u64,
            keys = loaded,
            usable,
            "remote moderation on"
        );
        if loaded == 0 {
            tracing::warn!(
                target: "mistguard::moderation",
                "remote moderation is on but no API key could be read: every call fails open (or closed, per rule) until one appears"
            );
        }
        Some(Arc::new(
            super::moderate::Moderation::new(
                Arc::new(client),
                config.moderation.clone(),
                &config.escalation,
            )
            .with_alerts(state.alerts()),
        ))
    } else {
        None
    };
    let shared = Arc::new(Shared {
        engine: ArcSwap::new(prepared.engine),
        limits: limits.clone(),
        state,
        records,
        ids: DecisionIds::new()?,
        subjects: prepared.subjects,
        inflight: Arc::new(Semaphore::new(limits.max_inflight)),
        streams: Arc::new(Semaphore::new(limits.max_streams)),
        draining: AtomicBool::new(false),
        shutdown: shutdown_rx,
        protect: super::protect::ProtectStore::new(config.protect.clone(), leak_key),
        placeholder_key,
        tools,
        moderation,
        decision_counts: Default::default(),
    });
    metrics::gauge!("mistguard_ruleset_info", "version" => version.clone()).set(1.0);
    m::set_model_info(None, shared.engine.load().model_version());

    let guard = GuardServer::new(GuardService::new(shared.clone()))
        .max_decoding_message_size(limits.max_message_bytes + ENVELOPE_BYTES);
    let tokens: Option<Tokens> = prepared.tokens.map(|t| Arc::new(ArcSwap::from_pointee(t)));
    let guard = Front {
        inner: guard,
        limit: limits.max_message_bytes,
        tokens: tokens.clone(),
    };
    let admin_tokens: Option<super::admin::AdminTokens> = prepared
        .admin_tokens
        .map(|t| Arc::new(ArcSwap::from_pointee(t)));
    let admin = pb::admin_server::AdminServer::new(super::admin::AdminService::new(
        shared.clone(),
        admin_tokens.clone(),
    ));
    // Reflection v1, and v1alpha for the clients that speak only it (Python's grpcio-reflection,
    // several GUI clients): their `list` would fail with UNIMPLEMENTED.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder().build_v1()?;
    let reflection_v1alpha = reflection_builder().build_v1alpha()?;

    let grpc_addr = listeners.grpc.local_addr()?;
    let resolver = prepared.tls.map(|key| Arc::new(CertResolver::new(key)));
    let tls_config = match &resolver {
        Some(r) => Some(tls::server_config(r.clone())?),
        None => None,
    };
    let (incoming, acceptor) = tls::incoming(listeners.grpc, tls_config.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
        .http2_max_local_error_reset_streams(limits.http2_max_local_error_reset_streams)
        .http2_max_pending_accept_reset_streams(Some(1024))
        .http2_max_header_list_size(16 * 1024)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(guard)
        .add_service(admin);
    // The rulesets are loaded (`prepare`): SERVING before the first connection is accepted, so a
    // client never sees NOT_SERVING from a daemon that is ready.
    health.set_serving::<GuardServer<GuardService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));

    let console_task = match (listeners.console, &admin_tokens) {
        (Some(l), Some(t)) => {
            let console = super::console::Console::new(
                shared.clone(),
                t.clone(),
                tls_config.is_some(),
                config.records.dir.clone(),
                config.escalation.level2_window,
            )
            .map_err(PrepareError)?;
            let tls = tls_config.as_deref().map(super::console::tls_config);
            if let Ok(addr) = l.local_addr() {
                tracing::info!(console_addr = %addr, https = tls.is_some(), "review console listening");
            }
            Some(tokio::spawn(super::console::serve(
                l,
                tls,
                Arc::new(console),
            )))
        }
        (Some(_), None) => {
            return Err(PrepareError(
                "console_listen needs admin_tokens_file: the review console is only for holders of an admin token".into(),
            )
            .into())
        }
        _ => None,
    };
    let metrics_task = listeners.metrics.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(metrics_addr = %addr, "metrics listening on /metrics");
        }
        tokio::spawn(m::serve(l, exporter))
    });
    let sweeper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                shared.state.sweep(super::state::now_ms());
                // Approvals that ended a day ago go; pending ones past their expiry turn expired.
                let tools = &shared.tools;
                if let Err(e) = tools
                    .approvals
                    .sweep(Duration::from_secs(24 * 3600), std::time::SystemTime::now())
                {
                    tracing::error!(target: "mistguard::approvals", error = %e, "approval sweep failed");
                }
                tools.observe_pending();
            }
        })
    };

    // Every second: while Redis is unreachable, probe it, and merge back once it answers.
    let maintainer = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                shared.state.maintain(super::state::now_ms()).await;
            }
        })
    };

    tracing::info!(
        addr = %grpc_addr,
        ruleset_version = %version,
        tls = resolver.is_some(),
        auth = tokens.is_some(),
        "mistguard serving"
    );
    if config.notify_systemd {
        // Type=notify: systemd starts the units ordered after this one, and `systemctl start`
        // returns, only now. Without NOTIFY_SOCKET (not under systemd) this does nothing.
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "could not tell systemd the daemon is ready");
        }
    }

    let reloadable = Reloadable {
        rulesets: config.rulesets.clone(),
        models: config.models.clone(),
        tokens,
        auth_tokens_file: config.auth_tokens_file.clone(),
        tls: resolver.zip(config.tls.clone()),
        policies: config.tools.policies.clone(),
        admin_tokens,
        admin_tokens_file: config.tools.admin_tokens_file.clone(),
    };
    let mut current_version = version;
    let early_exit = loop {
        tokio::select! {
            c = control.recv() => match c {
                Some(Control::Reload) => {
                    reload(&shared, &reloadable, &mut current_version).await;
                }
                Some(Control::Shutdown) | None => break None,
            },
            r = &mut server => break Some(r),
        }
    };
    if let Some(result) = early_exit {
        sweeper.abort();
        maintainer.abort();
        acceptor.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(t) = console_task {
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
    if config.notify_systemd {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
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
    acceptor.abort();
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
    maintainer.abort();
    if let Some(r) = &shared.records {
        r.flush().await;
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(t) = console_task {
        t.abort();
    }
    Ok(())
}

/// What SIGHUP reloads: the rulesets, the bearer tokens and the TLS certificate and key, each
/// from the files the configuration names.
struct Reloadable {
    rulesets: Option<std::path::PathBuf>,
    models: crate::load::Models,
    tokens: Option<Tokens>,
    auth_tokens_file: Option<std::path::PathBuf>,
    tls: Option<(Arc<CertResolver>, super::config::TlsFiles)>,
    policies: Option<std::path::PathBuf>,
    admin_tokens: Option<super::admin::AdminTokens>,
    admin_tokens_file: Option<std::path::PathBuf>,
}

fn count_reload(what: &'static str, ok: bool) {
    let outcome = if ok { "success" } else { "failure" };
    if what == "rulesets" {
        metrics::counter!("mistguard_ruleset_reloads_total", "outcome" => outcome).increment(1);
    } else {
        metrics::counter!("mistguard_credentials_reloads_total", "what" => what, "outcome" => outcome)
            .increment(1);
    }
}

/// Swaps in a token list read again (`what`: the metric label; `name`: what the log calls it),
/// or keeps the previous one when the new file is bad.
fn reload_tokens<T>(
    what: &'static str,
    name: &str,
    tokens: &ArcSwap<Vec<T>>,
    read: Result<Vec<T>, PrepareError>,
) {
    match read {
        Ok(new) => {
            let count = new.len();
            tokens.store(Arc::new(new));
            count_reload(what, true);
            tracing::info!(tokens = count, "{name} reloaded");
        }
        Err(e) => {
            count_reload(what, false);
            tracing::error!(error = %e, "{name} reload failed; the previous tokens stay valid");
        }
    }
}

/// Reloads each part aside and swaps it in whole; a part that fails keeps serving its old
/// version (and the others still reload). The rulesets compile off the async threads.
async fn reload(shared: &Shared, parts: &Reloadable, current_version: &mut String) {
    let started = std::time::Instant::now();
    let dir = parts.rulesets.clone();
    let models = parts.models.clone();
    let result = tokio::task::spawn_blocking(move || load_engine(dir.as_deref(), &models)).await;
    match result {
        Ok(Ok(engine)) => {
            let version = engine.version().to_string();
            m::register_hits(&engine);
            let model = engine.model_version().map(str::to_string);
            let old = shared.engine.swap(engine);
            m::set_model_info(old.model_version(), model.as_deref());
            count_reload("rulesets", true);
            if version != *current_version {
                metrics::gauge!("mistguard_ruleset_info", "version" => current_version.clone())
                    .set(0.0);
            }
            metrics::gauge!("mistguard_ruleset_info", "version" => version.clone()).set(1.0);
            tracing::info!(ruleset_version = %version, model_version = model.as_deref().unwrap_or("off"), millis = started.elapsed().as_millis() as u64, "rulesets reloaded");
            *current_version = version;
        }
        Ok(Err(e)) => {
            count_reload("rulesets", false);
            tracing::error!(error = %e, ruleset_version = %current_version, "ruleset reload failed; the previous rulesets keep serving");
        }
        Err(e) => {
            count_reload("rulesets", false);
            tracing::error!(error = %e, "ruleset reload panicked; the previous rulesets keep serving");
        }
    }
    if let (Some(tokens), Some(path)) = (&parts.tokens, &parts.auth_tokens_file) {
        reload_tokens("auth_tokens", "auth tokens", tokens, read_tokens(path));
    }
    if let Some(dir) = &parts.policies {
        let dir = dir.clone();
        let loaded = tokio::task::spawn_blocking(move || load_policies(Some(&dir)))
            .await
            .unwrap_or_else(|e| Err(PrepareError(format!("policies: {e}"))));
        match loaded {
            Ok(p) => {
                let rules = p.rules();
                let version = p.version().to_string();
                shared.tools.policies.store(Arc::new(p));
                count_reload("policies", true);
                tracing::info!(rules, policy_version = %version, "policies reloaded");
            }
            Err(e) => {
                count_reload("policies", false);
                tracing::error!(error = %e, "policies reload failed; the previous policies keep serving");
            }
        }
    }
    if let (Some(tokens), Some(path)) = (&parts.admin_tokens, &parts.admin_tokens_file) {
        reload_tokens(
            "admin_tokens",
            "admin tokens",
            tokens,
            read_admin_tokens(path),
        );
    }
    if let Some((resolver, files)) = &parts.tls {
        match tls::load(files) {
            Ok(key) => {
                resolver.swap(key);
                count_reload("tls", true);
                tracing::info!("TLS certificate and key reloaded; new connections use them");
            }
            Err(e) => {
                count_reload("tls", false);
                tracing::error!(error = %e, "TLS reload failed; the previous certificate keeps serving");
            }
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
    let console = match config.console_listen {
        None => None,
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (console): {e}"))?,
        ),
    };
    Ok(Listeners {
        grpc,
        metrics,
        console,
    })
}

async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (metrics): {e}"))
}
