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
pub mod console;
pub mod convert;
pub mod escalation;
pub mod front;
pub mod ids;
pub mod metrics;
pub mod moderate;
pub mod moderate_cli;
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

/// Flags of `mistguard serve`. Every setting of [`config::SETTINGS`] is a flag, a `MISTGUARD_*`
/// variable and a key in the `--config` file (see docs/DAEMON.md); flags beat the environment,
/// which beats the file. The flags are built from that table (see the `clap::Args` impl), so a
/// new setting needs no code here.
#[derive(Clone, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file (also `MISTGUARD_CONFIG`).
    pub config: Option<PathBuf>,
    /// Validate everything `serve` would load, bind nothing, print one line and exit.
    pub check_config: bool,
    /// Print every setting's effective value and where it came from (secrets masked), and exit.
    pub print_config: bool,
    /// The settings given as flags, keyed by setting key (`escalation.level2_hits`).
    pub flags: std::collections::HashMap<String, String>,
}

/// The clap id of a setting's flag.
fn arg_id(s: &config::Setting) -> String {
    s.key.replace('.', "_")
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut a = ServeArgs::default();
        a.update_from_arg_matches(m)?;
        Ok(a)
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        if let Some(c) = m.get_one::<PathBuf>("config") {
            self.config = Some(c.clone());
        }
        self.check_config |= m.get_flag("check_config");
        self.print_config |= m.get_flag("print_config");
        for s in config::SETTINGS {
            if let Some(v) = m.get_one::<String>(arg_id(s).as_str()) {
                self.flags.insert(s.key.to_string(), v.clone());
            }
        }
        Ok(())
    }
}

impl clap::Args for ServeArgs {
    /// `--config`, `--check-config`, `--print-config`, and one flag per setting with its help
    /// line from [`config::SETTINGS`] (what it does, its default and its environment variable),
    /// so `--help`, the config file and docs/DAEMON.md share one source. A setting's flag is its
    /// key with dots and underscores as dashes.
    fn augment_args(cmd: clap::Command) -> clap::Command {
        use clap::{Arg, ArgAction};
        let mut cmd = cmd
            .arg(
                Arg::new("config")
                    .long("config")
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("TOML configuration file [env: MISTGUARD_CONFIG]"),
            )
            .arg(
                Arg::new("check_config")
                    .long("check-config")
                    .action(ArgAction::SetTrue)
                    .help(
                        "Validate everything serve would load (settings, rulesets, token file, \
                         subject key, TLS certificate and key, moderation keys), bind nothing, \
                         print one line and exit: 0 when valid, 64 when not",
                    ),
            )
            .arg(
                Arg::new("print_config")
                    .long("print-config")
                    .action(ArgAction::SetTrue)
                    .help(
                        "Print every setting's effective value and where it came from (flag, \
                         env, file, default), with secrets masked, and exit (64 when invalid)",
                    ),
            );
        for s in config::SETTINGS {
            let mut help = s.help.replace('`', "");
            if !s.default.is_empty() {
                help.push_str(&format!(" [default: {}]", s.default));
            }
            help.push_str(&format!(" [env: {}]", s.env_var()));
            cmd = cmd.arg(
                Arg::new(arg_id(s))
                    .long(s.flag().trim_start_matches('-').to_string())
                    .value_name(value_name(s))
                    .help(help),
            );
        }
        cmd.after_help(
            "Flags beat MISTGUARD_* variables, which beat the --config file, which beats the \
             default. Durations: 500ms, 20s, 10m, 1h (a bare number is seconds); sizes: bytes, 64KiB, 1MiB. \
             Bad configuration is reported in one line before any port is bound (exit status 64). \
             See docs/DAEMON.md.",
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        ServeArgs::augment_args(cmd)
    }
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
    /// Every setting's effective value and its origin, one `key = value  # origin` line each,
    /// then the API keys' sources (masked). Secrets are never printed: a Redis URL's password is
    /// masked, keys are only counted.
    ///
    /// # Errors
    /// The config file cannot be read or parsed.
    pub fn effective(&self) -> Result<String, ConfigError> {
        Ok(self.sources()?.effective())
    }

    fn sources(&self) -> Result<Sources, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let mut sources = Sources {
            flags: self.flags.clone(),
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
        Ok(sources)
    }

    /// Gathers flags, the process environment and the config file, and validates them.
    ///
    /// # Errors
    /// One line naming the bad setting.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::from_sources(&self.sources()?)
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
    if args.print_config {
        match args.effective() {
            Ok(lines) => {
                print!("{lines}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                say(&format!("mistguard: configuration: {e}"));
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
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
        "mistguard: configuration OK: rulesets {} (version {}, {} rules), listen {}, metrics {}, TLS {}, auth tokens {}, log level {}, policies {}, admin tokens {}, approvals {}, state {}, records {}, moderation {}",
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
        },
        if config.moderation.enabled() {
            format!(
                "input {}, output {}, model {}, deadline {} ms, {} keys",
                config.moderation.input.as_str(),
                config.moderation.output.as_str(),
                config.moderation.client.model,
                config.moderation.deadline.as_millis(),
                config.moderation.client.keys.count()
            )
        } else {
            "off".to_string()
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
            flags: w.serve.flags.clone(),
            ..Default::default()
        };
        let c = Config::from_sources(&src).unwrap();
        assert_eq!(c.listen.port(), 7);
        assert_eq!(c.escalation.level2_hits, 4);
    }
}
