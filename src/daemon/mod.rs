//! The network daemon: `mistguard serve` and `mistguard bench`.
//!
//! The only module that knows tonic and prost. Requests are converted by hand at the boundary
//! (`convert.rs`) into the core's types; the core knows nothing of the network.
//!
//! - `config`: settings from flags, `MISTGUARD_*` environment and a TOML file, validated before
//!   any port is bound;
//! - `server`: the tonic server, health, reflection, reload and draining shutdown;
//! - `front`: what every Guard call goes through: authentication, client-error statuses, counting;
//! - `tls`: TLS termination with a certificate that SIGHUP replaces;
//! - `service`: the `mistguard.v1.Guard` RPCs;
//! - `escalation`: per-subject state of the escalation matrix;
//! - `ids`: decision ids and the keyed subject hash;
//! - `metrics`: Prometheus metrics and the `/metrics` endpoint;
//! - `bench`: the load generator.

pub mod admin;
pub mod admin_cli;
pub mod approvals;
pub mod approvals_redis;
pub mod bench;
pub mod config;
pub mod convert;
pub mod escalation;
pub mod front;
pub mod ids;
pub mod metrics;
pub mod pb;
pub mod protect;
pub mod recorder;
#[cfg(test)]
pub(crate) mod redis_test_server;
pub mod server;
pub mod service;
pub mod state;
pub mod tls;
pub mod tools;

pub use bench::{bench_main, BenchArgs};
pub use config::{Config, ConfigError, Sources};
pub use server::{prepare, serve_with, Control, Listeners, Prepared};

use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status for bad configuration (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// Flags of `mistguard serve`. Every flag also has a `MISTGUARD_*` variable and a key in the
/// `--config` file (see docs/DAEMON.md); flags beat the environment, which beats the file.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file (also `MISTGUARD_CONFIG`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate everything `serve` would load (settings, rulesets, token file, subject key, TLS
    /// certificate and key), bind nothing, print one line and exit: 0 when valid, 64 when not.
    #[arg(long)]
    pub check_config: bool,
    #[arg(long = "listen", value_name = "VALUE")]
    pub listen: Option<String>,
    #[arg(long = "metrics-listen", value_name = "VALUE")]
    pub metrics_listen: Option<String>,
    #[arg(long = "rulesets", value_name = "VALUE")]
    pub rulesets: Option<String>,
    #[arg(long = "models", value_name = "VALUE")]
    pub models: Option<String>,
    #[arg(long = "log-format", value_name = "VALUE")]
    pub log_format: Option<String>,
    #[arg(long = "log-level", value_name = "VALUE")]
    pub log_level: Option<String>,
    #[arg(long = "drain-deadline", value_name = "VALUE")]
    pub drain_deadline: Option<String>,
    #[arg(long = "max-message-bytes", value_name = "VALUE")]
    pub max_message_bytes: Option<String>,
    #[arg(long = "stream-max-bytes", value_name = "VALUE")]
    pub stream_max_bytes: Option<String>,
    #[arg(long = "stream-max-chunks", value_name = "VALUE")]
    pub stream_max_chunks: Option<String>,
    #[arg(long = "stream-idle-timeout", value_name = "VALUE")]
    pub stream_idle_timeout: Option<String>,
    #[arg(long = "max-streams-per-connection", value_name = "VALUE")]
    pub max_streams_per_connection: Option<String>,
    #[arg(long = "max-streams", value_name = "VALUE")]
    pub max_streams: Option<String>,
    #[arg(long = "max-inflight", value_name = "VALUE")]
    pub max_inflight: Option<String>,
    #[arg(long = "http2-keepalive-interval", value_name = "VALUE")]
    pub http2_keepalive_interval: Option<String>,
    #[arg(long = "http2-keepalive-timeout", value_name = "VALUE")]
    pub http2_keepalive_timeout: Option<String>,
    #[arg(long = "http2-max-local-error-reset-streams", value_name = "VALUE")]
    pub http2_max_local_error_reset_streams: Option<String>,
    #[arg(long = "tls-cert", value_name = "VALUE")]
    pub tls_cert: Option<String>,
    #[arg(long = "tls-key", value_name = "VALUE")]
    pub tls_key: Option<String>,
    #[arg(long = "auth-tokens-file", value_name = "VALUE")]
    pub auth_tokens_file: Option<String>,
    #[arg(long = "subject-key-file", value_name = "VALUE")]
    pub subject_key_file: Option<String>,
    #[arg(long = "escalation-level2-hits", value_name = "VALUE")]
    pub escalation_level2_hits: Option<String>,
    #[arg(long = "escalation-level2-window", value_name = "VALUE")]
    pub escalation_level2_window: Option<String>,
    #[arg(long = "escalation-suspension", value_name = "VALUE")]
    pub escalation_suspension: Option<String>,
    #[arg(long = "escalation-rate-limit", value_name = "VALUE")]
    pub escalation_rate_limit: Option<String>,
    #[arg(long = "escalation-level3-subjects", value_name = "VALUE")]
    pub escalation_level3_subjects: Option<String>,
    #[arg(long = "escalation-level3-window", value_name = "VALUE")]
    pub escalation_level3_window: Option<String>,
    #[arg(long = "escalation-max-subjects", value_name = "VALUE")]
    pub escalation_max_subjects: Option<String>,
    #[arg(long = "policies", value_name = "VALUE")]
    pub policies: Option<String>,
    #[arg(long = "default-decision", value_name = "VALUE")]
    pub default_decision: Option<String>,
    #[arg(long = "approval-ttl", value_name = "VALUE")]
    pub approval_ttl: Option<String>,
    #[arg(long = "admin-tokens-file", value_name = "VALUE")]
    pub admin_tokens_file: Option<String>,
    #[arg(long = "data-dir", value_name = "VALUE")]
    pub data_dir: Option<String>,
    #[arg(long = "protect-max-texts", value_name = "VALUE")]
    pub protect_max_texts: Option<String>,
    #[arg(long = "protect-max-bytes", value_name = "VALUE")]
    pub protect_max_bytes: Option<String>,
    #[arg(long = "protect-ttl", value_name = "VALUE")]
    pub protect_ttl: Option<String>,
    #[arg(long = "protect-max-ttl", value_name = "VALUE")]
    pub protect_max_ttl: Option<String>,
    #[arg(long = "records-dir", value_name = "VALUE")]
    pub records_dir: Option<String>,
    #[arg(long = "records-durability", value_name = "VALUE")]
    pub records_durability: Option<String>,
    #[arg(long = "records-on-error", value_name = "VALUE")]
    pub records_on_error: Option<String>,
    #[arg(long = "records-commit-delay", value_name = "VALUE")]
    pub records_commit_delay: Option<String>,
    #[arg(long = "records-queue", value_name = "VALUE")]
    pub records_queue: Option<String>,
    #[arg(long = "records-segment-bytes", value_name = "VALUE")]
    pub records_segment_bytes: Option<String>,
    #[arg(long = "records-retain", value_name = "VALUE")]
    pub records_retain: Option<String>,
    #[arg(long = "records-max-bytes", value_name = "VALUE")]
    pub records_max_bytes: Option<String>,
    #[arg(long = "records-reports-retain", value_name = "VALUE")]
    pub records_reports_retain: Option<String>,
    #[arg(long = "records-samples", value_name = "VALUE")]
    pub records_samples: Option<String>,
    #[arg(long = "records-samples-retain", value_name = "VALUE")]
    pub records_samples_retain: Option<String>,
    #[arg(long = "redis-url", value_name = "VALUE")]
    pub redis_url: Option<String>,
    #[arg(long = "redis-timeout", value_name = "VALUE")]
    pub redis_timeout: Option<String>,
    #[arg(long = "redis-required", value_name = "VALUE")]
    pub redis_required: Option<String>,
    #[arg(long = "redis-prefix", value_name = "VALUE")]
    pub redis_prefix: Option<String>,
    #[arg(long = "limits-input-requests", value_name = "VALUE")]
    pub limits_input_requests: Option<String>,
    #[arg(long = "limits-input-bytes", value_name = "VALUE")]
    pub limits_input_bytes: Option<String>,
    #[arg(long = "limits-output-requests", value_name = "VALUE")]
    pub limits_output_requests: Option<String>,
    #[arg(long = "limits-output-bytes", value_name = "VALUE")]
    pub limits_output_bytes: Option<String>,
    #[arg(long = "limits-scope", value_name = "VALUE")]
    pub limits_scope: Option<String>,
    #[arg(long = "limits-when-redis-down", value_name = "VALUE")]
    pub limits_when_redis_down: Option<String>,
}

/// Gives each flag of `mistguard serve` its help line from [`config::SETTINGS`] (what it does, its
/// default and its environment variable), so `--help`, the config file and docs/DAEMON.md share
/// one source. A setting's flag is its key with dots and underscores as dashes.
pub fn describe_serve_flags(mut cmd: clap::Command) -> clap::Command {
    for s in config::SETTINGS {
        let id = s.key.replace('.', "_");
        let mut help = s.help.replace('`', "");
        if !s.default.is_empty() {
            help.push_str(&format!(" [default: {}]", s.default));
        }
        help.push_str(&format!(" [env: {}]", s.env_var()));
        let value_name = value_name(s);
        cmd = cmd.mut_arg(id, |a| a.help(help).value_name(value_name));
    }
    cmd.after_help(
        "Flags beat MISTGUARD_* variables, which beat the --config file, which beats the \
         default. Durations: 500ms, 20s, 10m, 1h (a bare number is seconds); sizes: bytes, 64KiB, 1MiB. \
         Bad configuration is reported in one line before any port is bound (exit status 64). \
         See docs/DAEMON.md.",
    )
}

/// The placeholder a flag's value is shown with in `--help`.
fn value_name(s: &config::Setting) -> &'static str {
    let d = s.default;
    if s.key.ends_with("listen") {
        "ADDR"
    } else if s.key.ends_with("_file")
        || s.key.starts_with("tls_")
        || s.key == "rulesets"
        || s.key == "models"
    {
        "PATH"
    } else if d.ends_with("MiB") || d.ends_with("KiB") {
        "SIZE"
    } else if d.ends_with('s') || d.ends_with('m') || d.ends_with('h') {
        "DURATION"
    } else if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) {
        "N"
    } else {
        "VALUE"
    }
}

impl ServeArgs {
    /// The flags given, keyed by setting key.
    pub fn flag_values(&self) -> std::collections::HashMap<String, String> {
        let pairs: [(&str, &Option<String>); 58] = [
            ("listen", &self.listen),
            ("metrics_listen", &self.metrics_listen),
            ("rulesets", &self.rulesets),
            ("models", &self.models),
            ("log_format", &self.log_format),
            ("log_level", &self.log_level),
            ("drain_deadline", &self.drain_deadline),
            ("max_message_bytes", &self.max_message_bytes),
            ("stream_max_bytes", &self.stream_max_bytes),
            ("stream_max_chunks", &self.stream_max_chunks),
            ("stream_idle_timeout", &self.stream_idle_timeout),
            (
                "max_streams_per_connection",
                &self.max_streams_per_connection,
            ),
            ("max_streams", &self.max_streams),
            ("max_inflight", &self.max_inflight),
            ("http2_keepalive_interval", &self.http2_keepalive_interval),
            ("http2_keepalive_timeout", &self.http2_keepalive_timeout),
            (
                "http2_max_local_error_reset_streams",
                &self.http2_max_local_error_reset_streams,
            ),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("auth_tokens_file", &self.auth_tokens_file),
            ("subject_key_file", &self.subject_key_file),
            ("escalation.level2_hits", &self.escalation_level2_hits),
            ("escalation.level2_window", &self.escalation_level2_window),
            ("escalation.suspension", &self.escalation_suspension),
            ("escalation.rate_limit", &self.escalation_rate_limit),
            (
                "escalation.level3_subjects",
                &self.escalation_level3_subjects,
            ),
            ("escalation.level3_window", &self.escalation_level3_window),
            ("escalation.max_subjects", &self.escalation_max_subjects),
            ("policies", &self.policies),
            ("default_decision", &self.default_decision),
            ("approval_ttl", &self.approval_ttl),
            ("admin_tokens_file", &self.admin_tokens_file),
            ("data_dir", &self.data_dir),
            ("protect.max_texts", &self.protect_max_texts),
            ("protect.max_bytes", &self.protect_max_bytes),
            ("protect.ttl", &self.protect_ttl),
            ("protect.max_ttl", &self.protect_max_ttl),
            ("records.dir", &self.records_dir),
            ("records.durability", &self.records_durability),
            ("records.on_error", &self.records_on_error),
            ("records.commit_delay", &self.records_commit_delay),
            ("records.queue", &self.records_queue),
            ("records.segment_bytes", &self.records_segment_bytes),
            ("records.retain", &self.records_retain),
            ("records.max_bytes", &self.records_max_bytes),
            ("records.reports_retain", &self.records_reports_retain),
            ("records.samples", &self.records_samples),
            ("records.samples_retain", &self.records_samples_retain),
            ("redis.url", &self.redis_url),
            ("redis.timeout", &self.redis_timeout),
            ("redis.required", &self.redis_required),
            ("redis.prefix", &self.redis_prefix),
            ("limits.input_requests", &self.limits_input_requests),
            ("limits.input_bytes", &self.limits_input_bytes),
            ("limits.output_requests", &self.limits_output_requests),
            ("limits.output_bytes", &self.limits_output_bytes),
            ("limits.scope", &self.limits_scope),
            ("limits.when_redis_down", &self.limits_when_redis_down),
        ];
        pairs
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
            .collect()
    }

    /// Gathers flags, the process environment and the config file, and validates them.
    ///
    /// # Errors
    /// One line naming the bad setting.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let mut sources = Sources {
            flags: self.flag_values(),
            ..Default::default()
        }
        .with_env(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let file = self
            .config
            .clone()
            .or_else(|| std::env::var_os("MISTGUARD_CONFIG").map(PathBuf::from));
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            sources = sources.with_file_text(&path, &text)?;
        }
        Config::from_sources(&sources)
    }
}

/// The log writer: stderr, where a failed write is counted
/// (`mistguard_log_write_errors_total`) and dropped. tracing-subscriber reports a failed write
/// with `eprintln!`, which panics when stderr is a closed pipe: the call being logged then died
/// with CANCELLED instead of its verdict, and a SIGTERM exited 101. A log line is never worth a
/// request.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // tracing-subscriber formats an event whole, then writes it once: a line is written
        // whole or counted as lost.
        if std::io::stderr().lock().write_all(buf).is_err() {
            ::metrics::counter!("mistguard_log_write_errors_total").increment(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn init_logging(config: &Config) {
    // `config.log_level` was validated with the configuration.
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .log_internal_errors(false)
        // Colour only on a terminal: a log file or collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match config.log_format {
        config::LogFormat::Json => builder.json().flatten_event(true).try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}

/// One line on stderr for the operator, before logging starts or instead of it; a closed stderr
/// is not a reason to panic (`eprintln!` would).
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `mistguard serve`: validates the configuration and loads every file before binding; exits 64
/// with one line on stderr when anything is wrong. With `--check-config`, stops there.
pub fn serve_main(args: ServeArgs) -> ExitCode {
    // A SIGHUP (`systemctl reload`) while the rulesets are still compiling must not kill the
    // daemon (the default action): ignore it until the reload handler is installed, just before
    // serving. The rulesets being loaded are the ones a reload would read anyway.
    // SAFETY: no other thread exists yet; SIG_IGN is a valid disposition.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let mut config = match args.load() {
        Ok(c) => c,
        Err(e) => {
            say(&format!("mistguard: configuration: {e}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let prepared = match prepare(&config) {
        Ok(p) => p,
        Err(e) => {
            say(&format!("mistguard: configuration: {e}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        println!("{}", check_summary(&config, &prepared));
        return ExitCode::SUCCESS;
    }
    config.notify_systemd = true;
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say(&format!("mistguard: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let deadline = config.drain_deadline;
    let result = runtime.block_on(async move {
        let listeners = match server::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                say(&format!("mistguard: {e}"));
                return Err(ExitCode::FAILURE);
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // The handlers are installed here, before the server starts and says it is serving: a
        // SIGHUP or SIGTERM sent as soon as it is up must not find the default action (exit).
        let signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                say(&format!("mistguard: cannot install signal handlers: {e}"));
                return Err(ExitCode::FAILURE);
            }
        };
        tokio::spawn(signals.forward(tx));
        serve_with(config, prepared, listeners, rx)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            })
    });
    // Tasks that outlived the drain (a connection stuck mid-write) must not hold the exit.
    runtime.shutdown_timeout(deadline.min(std::time::Duration::from_secs(1)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// The line `serve --check-config` prints for a valid configuration.
fn check_summary(config: &Config, prepared: &Prepared) -> String {
    let rules = prepared.engine.ruleset();
    format!(
        "mistguard: configuration OK: rulesets {} (version {}, {} rules), listen {}, metrics {}, TLS {}, auth tokens {}, log level {}, policies {}, admin tokens {}, approvals {}, state {}, records {}",
        rules.source,
        rules.version,
        rules.rules.len(),
        config.listen,
        config
            .metrics_listen
            .map_or_else(|| "off".to_string(), |a| a.to_string()),
        if config.tls.is_some() { "on" } else { "off" },
        prepared
            .tokens
            .as_ref()
            .map_or_else(|| "off".to_string(), |t| t.len().to_string()),
        config.log_level,
        match &config.tools.policies {
            Some(d) => format!(
                "{} ({} rules, version {})",
                d.display(),
                prepared.policies.rules(),
                prepared.policies.version()
            ),
            None => "none".to_string(),
        },
        prepared
            .admin_tokens
            .as_ref()
            .map_or_else(|| "off".to_string(), |t| t.len().to_string()),
        match (&config.redis.url, &config.tools.data_dir) {
            (Some(_), _) => "in Redis".to_string(),
            (None, Some(d)) => format!("{}/{}", d.display(), server::APPROVALS_FILE),
            (None, None) => "in memory".to_string(),
        },
        match (&config.redis.url, &config.tools.data_dir) {
            // The URL may hold a password: not printed.
            (Some(_), _) => format!(
                "shared in Redis (timeout {} ms, {})",
                config.redis.timeout.as_millis(),
                if config.redis.required {
                    "required at start"
                } else {
                    "degraded start allowed"
                }
            ),
            (None, Some(d)) => format!("local, suspensions kept in {}/{}", d.display(), state::disk::STATE_FILE),
            (None, None) => "local, in memory".to_string(),
        },
        match &config.records.dir {
            Some(d) => format!(
                "{} ({})",
                d.display(),
                if config.records.sync { "sync" } else { "async" }
            ),
            None => "log lines only".to_string(),
        }
    )
}

/// SIGHUP (reload), SIGTERM and SIGINT (shutdown), listened to from the moment they are installed.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn forward(mut self, tx: tokio::sync::mpsc::Sender<Control>) {
        loop {
            let c = tokio::select! {
                _ = self.hup.recv() => Control::Reload,
                _ = self.term.recv() => Control::Shutdown,
                _ = self.int.recv() => Control::Shutdown,
            };
            tracing::info!(signal = ?c, "signal received");
            if tx.send(c).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn every_setting_has_its_flag() {
        let cmd = Wrapper::command();
        for s in config::SETTINGS {
            let flag = s.flag();
            assert!(
                cmd.get_arguments()
                    .any(|a| a.get_long().map(|l| format!("--{l}")) == Some(flag.clone())),
                "no flag {flag}"
            );
        }
    }

    #[test]
    fn flags_reach_the_config() {
        use clap::Parser;
        let w = Wrapper::try_parse_from([
            "x",
            "--listen",
            "127.0.0.1:7",
            "--escalation-level2-hits",
            "4",
        ])
        .unwrap();
        let src = Sources {
            flags: w.serve.flag_values(),
            ..Default::default()
        };
        let c = Config::from_sources(&src).unwrap();
        assert_eq!(c.listen.port(), 7);
        assert_eq!(c.escalation.level2_hits, 4);
    }
}
