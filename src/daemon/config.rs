//! The daemon's configuration: every setting has a command-line flag, a `MISTGUARD_*` environment
//! variable and a key in the TOML file; flags beat the environment, which beats the file, which
//! beats the default.
//!
//! Parsing works on plain maps ([`Sources`]) so tests can feed it without touching the process
//! environment (linkerd2's `env.rs` does the same). Everything is validated here, before any port
//! is bound: a bad value is reported in one line naming the setting and where it came from.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::action::Action;
use crate::io::moderation::{ClientConfig, KeySource};
use crate::moderation::{CategoryRule, Mapping, Target};

/// One setting: its file key, and the flag and environment variable derived from it.
pub struct Setting {
    /// Key in the TOML file; a dot is a table (`escalation.level2_hits` is `level2_hits` in
    /// `[escalation]`).
    pub key: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

impl Setting {
    /// `MISTGUARD_` + the key in upper case, dots and dashes as underscores.
    pub fn env_var(&self) -> String {
        format!(
            "MISTGUARD_{}",
            self.key.to_uppercase().replace(['.', '-'], "_")
        )
    }

    /// `--` + the key, dots and underscores as dashes.
    pub fn flag(&self) -> String {
        format!("--{}", self.key.replace(['.', '_'], "-"))
    }
}

/// Every setting the daemon reads, in the order of `docs/DAEMON.md`.
pub const SETTINGS: &[Setting] = &[
    Setting { key: "listen", default: "127.0.0.1:50051", help: "gRPC listen address" },
    Setting {
        key: "metrics_listen",
        default: "127.0.0.1:9464",
        help: "Prometheus `/metrics` listen address (`off` disables it)",
    },
    Setting {
        key: "console_listen",
        default: "off",
        help: "review console (HTTP, HTTPS with `tls_cert`) listen address; needs `admin_tokens_file` (`off` disables it)",
    },
    Setting {
        key: "rulesets",
        default: "bundled",
        help: "rulesets directory (`bundled`: the rulesets compiled into the binary)",
    },
    Setting {
        key: "models",
        default: "bundled",
        help: "learned-tier model directory, holding mistguard-model.bin (`bundled`: the model compiled into the binary; `off`: the rules alone)",
    },
    Setting { key: "log_format", default: "text", help: "`text` or `json`" },
    Setting { key: "log_level", default: "info", help: "tracing filter (`info`, `mistguard=debug`)" },
    Setting {
        key: "drain_deadline",
        default: "20s",
        help: "on SIGTERM/SIGINT, the process exits at the latest this long after the signal",
    },
    Setting {
        key: "max_message_bytes",
        default: "1MiB",
        help: "largest text of one Classify request or one stream chunk",
    },
    Setting { key: "stream_max_bytes", default: "64MiB", help: "largest total text of one stream" },
    Setting { key: "stream_max_chunks", default: "100000", help: "most chunks in one stream" },
    Setting {
        key: "stream_idle_timeout",
        default: "60s",
        help: "a stream with no message for this long is ended with DEADLINE_EXCEEDED",
    },
    Setting {
        key: "max_streams_per_connection",
        default: "256",
        help: "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS",
    },
    Setting {
        key: "max_streams",
        default: "10000",
        help: "open ClassifyStream calls in total; more are refused with RESOURCE_EXHAUSTED",
    },
    Setting {
        key: "max_inflight",
        default: "2048",
        help: "unary calls in progress in total; more are refused with RESOURCE_EXHAUSTED",
    },
    Setting { key: "http2_keepalive_interval", default: "30s", help: "HTTP/2 PING interval" },
    Setting {
        key: "http2_keepalive_timeout",
        default: "10s",
        help: "a connection whose PING is not answered in this time is closed",
    },
    Setting {
        key: "http2_max_local_error_reset_streams",
        default: "1024",
        help: "streams reset for protocol errors before the connection is closed (0: no limit)",
    },
    Setting { key: "tls_cert", default: "", help: "PEM certificate chain; TLS is on when set" },
    Setting { key: "tls_key", default: "", help: "PEM private key (with `tls_cert`)" },
    Setting {
        key: "auth_tokens_file",
        default: "",
        help: "file of bearer tokens, one a line; when set, Guard calls need `authorization: Bearer <token>`",
    },
    Setting {
        key: "subject_key_file",
        default: "",
        help: "file holding the key of the subject hash (>= 32 bytes); empty: the key in `data_dir` (created on first start), else a random key per process",
    },
    Setting {
        key: "escalation.level2_hits",
        default: "3",
        help: "decisions of BLOCK or above that put a subject at level 2",
    },
    Setting { key: "escalation.level2_window", default: "10m", help: "window for those decisions" },
    Setting {
        key: "escalation.suspension",
        default: "15m",
        help: "how long a level-2 subject is answered BLOCK (`suspended`)",
    },
    Setting {
        key: "escalation.rate_limit",
        default: "5m",
        help: "how long a subject is answered RATE_LIMIT after a RULE-MIST-010 hit",
    },
    Setting {
        key: "escalation.level3_subjects",
        default: "5",
        help: "distinct subjects reaching level 2 within the level-3 window that raise the alert",
    },
    Setting { key: "escalation.level3_window", default: "10m", help: "window of the level-3 alert" },
    Setting {
        key: "escalation.level3_novel",
        default: "10",
        help: "remote moderation hits on texts the local rules passed (novel attacks), within escalation.level3_window, that raise the level-3 alert",
    },
    Setting {
        key: "escalation.max_subjects",
        default: "100000",
        help: "subjects tracked at once (state is bounded; expired entries are swept)",
    },
    Setting {
        key: "policies",
        default: "",
        help: "tool-call policies directory (YAML files; see policies/README.md); empty: no policies, every call gets `default_decision` after the content scan",
    },
    Setting {
        key: "default_decision",
        default: "allow",
        help: "AuthorizeToolCall's answer when no policy rule matches and the content scan finds nothing that asks more (`allow` or `deny`)",
    },
    Setting {
        key: "approval_ttl",
        default: "15m",
        help: "how long an approval of a tool call stays pending, and an approved one usable",
    },
    Setting {
        key: "admin_tokens_file",
        default: "",
        help: "admin bearer tokens, one a line: `<token> <approver name> <group>[,<group>...]`; empty: the Admin service refuses every call",
    },
    Setting {
        key: "data_dir",
        default: "",
        help: "directory of the daemon's durable state (pending approvals survive a restart); empty: kept in memory",
    },
    Setting {
        key: "protect.max_texts",
        default: "10000",
        help: "protected texts (ProtectText) held at once; RESOURCE_EXHAUSTED past it, once expired ones are swept",
    },
    Setting {
        key: "protect.max_bytes",
        default: "64MiB",
        help: "bytes of shingle hashes the protected texts may hold together (8 per shingle)",
    },
    Setting {
        key: "protect.ttl",
        default: "24h",
        help: "how long a protected text is kept when ProtectText names no ttl_seconds",
    },
    Setting {
        key: "protect.max_ttl",
        default: "168h",
        help: "the longest ttl_seconds ProtectText accepts",
    },
    Setting {
        key: "records.dir",
        default: "",
        help: "directory of the decision records (append-only, hash-chained JSONL segments; docs/DAEMON.md, 'Decision records on disk'); empty: records are only log lines",
    },
    Setting {
        key: "records.durability",
        default: "sync",
        help: "`sync`: an RPC answers once its record is on disk (group commit); `async`: records wait in a bounded queue, dropped and counted when it is full",
    },
    Setting {
        key: "records.on_error",
        default: "fail_closed",
        help: "when a record cannot be written in `sync` mode (disk full, read-only): `fail_closed` answers UNAVAILABLE; `continue` answers and counts the loss",
    },
    Setting {
        key: "records.commit_delay",
        default: "0ms",
        help: "in `sync` mode, how long a small group commit waits for more records before its fsync (like PostgreSQL's commit_delay); raise it (about 1ms) under heavy concurrency to make fewer, larger fsyncs",
    },
    Setting {
        key: "records.queue",
        default: "65536",
        help: "records waiting to be written, at most (per sink)",
    },
    Setting {
        key: "records.segment_bytes",
        default: "64MiB",
        help: "a segment is closed and a new one started at this size",
    },
    Setting {
        key: "records.retain",
        default: "30d",
        help: "decision record segments older than this are deleted",
    },
    Setting {
        key: "records.max_bytes",
        default: "8GiB",
        help: "the oldest decision record segments are deleted past this total size",
    },
    Setting {
        key: "records.reports_retain",
        default: "365d",
        help: "retention of the RULE-MIST-005 report sink (records/reports), kept apart",
    },
    Setting {
        key: "records.samples",
        default: "off",
        help: "`on` keeps RULE-MIST-007 retraining samples WITH THEIR TEXT in records/samples (opt-in; see README)",
    },
    Setting {
        key: "records.samples_retain",
        default: "30d",
        help: "retention of the retraining samples",
    },
    Setting {
        key: "records.novel_samples",
        default: "off",
        help: "`on` keeps texts that remote moderation flagged and the local rules passed, WITH THEIR TEXT, in records/novel for rule writers (opt-in; kept for records.samples_retain)",
    },
    Setting {
        key: "redis.url",
        default: "",
        help: "Redis for per-subject state shared across replicas (`redis://HOST:PORT/DB`); empty: state is local",
    },
    Setting {
        key: "redis.timeout",
        default: "50ms",
        help: "the longest a request waits for Redis; past it, local state answers",
    },
    Setting {
        key: "redis.required",
        default: "false",
        help: "`true`: an unreachable Redis at start-up stops the start; `false`: start degraded and reconnect",
    },
    Setting {
        key: "redis.prefix",
        default: "mistguard:",
        help: "prefix of every Redis key (replicas that share state share it)",
    },
    Setting {
        key: "limits.input_requests",
        default: "off",
        help: "requests per subject for prompts (DIRECTION_INPUT or unspecified), like `600/1m`; `off`: none",
    },
    Setting {
        key: "limits.input_bytes",
        default: "off",
        help: "budget of text bytes per subject for prompts, like `10MiB/1h`; `off`: none",
    },
    Setting {
        key: "limits.output_requests",
        default: "off",
        help: "requests per subject for completions (DIRECTION_OUTPUT), like `600/1m`",
    },
    Setting {
        key: "limits.output_bytes",
        default: "off",
        help: "budget of text bytes per subject for completions, like `50MiB/1h`",
    },
    Setting {
        key: "limits.scope",
        default: "shared",
        help: "`shared`: limits are counted in Redis when `redis.url` is set (exact across replicas); `local`: per replica",
    },
    Setting {
        key: "limits.when_redis_down",
        default: "local",
        help: "while Redis is unreachable, `local` enforces the limits per replica (fail open to local counts); `closed` answers RATE_LIMIT",
    },
    Setting {
        key: "moderation.input",
        default: "auto",
        help: "which prompts are sent to Mistral's moderation API: `never`, `on_request` (when the request asks), `when_unsure` (local verdict ALLOW or FLAG, or asked), `always`; `auto`: `when_unsure` with an API key, else `never`",
    },
    Setting {
        key: "moderation.output",
        default: "auto",
        help: "the same for completions (DIRECTION_OUTPUT, Classify and ClassifyStream)",
    },
    Setting {
        key: "moderation.deadline",
        default: "200ms",
        help: "the longest a verdict waits for the remote answer; past it the local verdict stands, plus each mapped rule's fail mode",
    },
    Setting {
        key: "moderation.url",
        default: "https://api.mistral.ai",
        help: "base URL of the moderation API (POST /v1/moderations)",
    },
    Setting {
        key: "moderation.model",
        default: "mistral-moderation-latest",
        help: "moderation model (`mistral-moderation-2411`, `mistral-moderation-2603`, ...)",
    },
    Setting {
        key: "moderation.keys_file",
        default: "",
        help: "file of API keys, one per line, re-read when it changes (also MISTRAL_API_KEY and MISTRAL_API_KEYS, comma-separated); keys rotate, a refused key sits out",
    },
    Setting {
        key: "moderation.categories",
        default: "",
        help: "changes to the category table, comma-separated `category=TARGET[:ACTION][@THRESHOLD]`; TARGET a rule id, `flag` or `off` (see docs/DAEMON.md for the defaults)",
    },
    Setting {
        key: "moderation.fail_closed_input",
        default: "",
        help: "mapped rules (comma-separated rule ids, `MODERATION` for the FLAG categories) treated as hit on a prompt when the remote answer is late or fails; others fail open",
    },
    Setting {
        key: "moderation.fail_closed_output",
        default: "",
        help: "the same for completions",
    },
    Setting {
        key: "moderation.stream_window",
        default: "1KiB",
        help: "a stream is moderated in windows that end at a sentence end past a quarter of this size, or at this size",
    },
    Setting {
        key: "moderation.stream_mode",
        default: "background",
        help: "`background`: window verdicts arrive as later stream responses; `strict`: text is released only once its window's remote verdict is in",
    },
    Setting {
        key: "moderation.attempt_timeout",
        default: "2s",
        help: "timeout of one HTTP request to the API",
    },
    Setting {
        key: "moderation.call_timeout",
        default: "5s",
        help: "the longest one call may take, retries included (answers past the deadline still fill the cache)",
    },
    Setting {
        key: "moderation.retries",
        default: "2",
        help: "retries of a call after 429, 5xx, timeouts and network errors (backoff 500ms, x1.5, jitter; Retry-After honoured)",
    },
    Setting {
        key: "moderation.retry_budget",
        default: "0.2",
        help: "retries may be at most this fraction of calls per minute (plus 10)",
    },
    Setting {
        key: "moderation.batch_size",
        default: "16",
        help: "texts per API call (halved when the API refuses a batch with 400 or 413)",
    },
    Setting {
        key: "moderation.batch_window",
        default: "2ms",
        help: "how long concurrent texts are gathered into one API call",
    },
    Setting {
        key: "moderation.requests_per_minute",
        default: "off",
        help: "client-side limit on API requests per minute, under the organisation's (`off`: none)",
    },
    Setting {
        key: "moderation.tokens_per_minute",
        default: "off",
        help: "client-side limit on estimated tokens (bytes/4) per minute (`off`: none)",
    },
    Setting {
        key: "moderation.budget_tokens_per_hour",
        default: "off",
        help: "spending cap: estimated tokens sent per hour in all; over it the fail mode applies (`off`: none)",
    },
    Setting {
        key: "moderation.subject_budget_tokens_per_hour",
        default: "off",
        help: "spending cap per subject, per hour (`off`: none)",
    },
    Setting {
        key: "moderation.cache_entries",
        default: "10000",
        help: "answers kept so identical text is not paid for twice (0: no cache)",
    },
    Setting {
        key: "moderation.cache_ttl",
        default: "1h",
        help: "how long a cached answer is used",
    },
    Setting {
        key: "moderation.breaker_failures",
        default: "5",
        help: "consecutive failed calls that open the circuit breaker",
    },
    Setting {
        key: "moderation.breaker_cooldown",
        default: "30s",
        help: "how long the breaker stays open before one probe call",
    },
    Setting {
        key: "moderation.key_cooldown",
        default: "5m",
        help: "how long a key answered 401 or 403 stays out of the rotation",
    },
];

/// Where a value came from, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
    File,
    Default,
}

/// The raw values of every source, keyed by setting key (`escalation.level2_hits`).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub flags: HashMap<String, String>,
    pub env: HashMap<String, String>,
    pub file: HashMap<String, String>,
    /// The config file's path, for error messages.
    pub file_path: Option<PathBuf>,
    /// `MISTRAL_API_KEY` and `MISTRAL_API_KEYS` (their Debug is masked).
    pub api_keys: KeySource,
}

impl Sources {
    /// Reads the environment variables of every setting from `env` (a snapshot of the process
    /// environment, or a test's map).
    pub fn with_env<'a>(mut self, env: impl IntoIterator<Item = (&'a str, &'a str)>) -> Sources {
        let wanted: HashMap<String, &'static str> =
            SETTINGS.iter().map(|s| (s.env_var(), s.key)).collect();
        for (name, value) in env {
            match name {
                "MISTRAL_API_KEY" if !value.trim().is_empty() => {
                    self.api_keys.single = Some(value.trim().to_string());
                }
                "MISTRAL_API_KEYS" if !value.trim().is_empty() => {
                    self.api_keys.list = Some(value.to_string());
                }
                _ => {}
            }
            if let Some(key) = wanted.get(name) {
                self.env.insert((*key).to_string(), value.to_string());
            }
        }
        self
    }

    /// Parses a TOML config file's text. Unknown keys are refused (a typo must not go unnoticed).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file and the key or the TOML error.
    pub fn with_file_text(mut self, path: &Path, text: &str) -> Result<Sources, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError(format!("{}: {}", path.display(), e.message()))
        })?;
        let mut flat = BTreeMap::new();
        flatten("", &table, &mut flat);
        for (key, value) in flat {
            if !SETTINGS.iter().any(|s| s.key == key) {
                return Err(ConfigError(format!(
                    "{}: unknown setting `{key}` (see docs/DAEMON.md for the list)",
                    path.display()
                )));
            }
            self.file.insert(key, value);
        }
        self.file_path = Some(path.to_path_buf());
        Ok(self)
    }

    /// Every setting's effective value and where it came from, one `key = "value"  # origin`
    /// line each (TOML a config file can start from), then where API keys come from. Secrets are
    /// masked: a Redis URL's password, and keys, which are only counted.
    pub fn effective(&self) -> String {
        let mut out = String::new();
        for s in SETTINGS {
            let (v, origin) = self.get(s.key);
            let v = if s.key == "redis.url" {
                mask_url_password(&v)
            } else {
                v
            };
            let origin = match origin {
                Origin::Flag => s.flag(),
                Origin::Env => s.env_var(),
                Origin::File => "config file".to_string(),
                Origin::Default => "default".to_string(),
            };
            out.push_str(&format!("{} = {:?}  # {origin}\n", s.key, v));
        }
        let count = |v: &Option<String>, list: bool| match v {
            None => "unset".to_string(),
            Some(v) if list => format!(
                "set, {} keys (masked)",
                v.split(',').filter(|k| !k.trim().is_empty()).count()
            ),
            Some(_) => "set (masked)".to_string(),
        };
        out.push_str(&format!(
            "# MISTRAL_API_KEY: {}\n# MISTRAL_API_KEYS: {}\n",
            count(&self.api_keys.single, false),
            count(&self.api_keys.list, true)
        ));
        out
    }

    fn get(&self, key: &str) -> (String, Origin) {
        if let Some(v) = self.flags.get(key) {
            return (v.clone(), Origin::Flag);
        }
        if let Some(v) = self.env.get(key) {
            return (v.clone(), Origin::Env);
        }
        if let Some(v) = self.file.get(key) {
            return (v.clone(), Origin::File);
        }
        let default = SETTINGS
            .iter()
            .find(|s| s.key == key)
            .map(|s| s.default)
            .unwrap_or("");
        (default.to_string(), Origin::Default)
    }

    fn describe(&self, key: &str, origin: Origin) -> String {
        let setting = SETTINGS
            .iter()
            .find(|s| s.key == key)
            .expect("known setting");
        match origin {
            Origin::Flag => setting.flag(),
            Origin::Env => setting.env_var(),
            Origin::File => match &self.file_path {
                Some(p) => format!("{}: `{key}`", p.display()),
                None => format!("`{key}` in the config file"),
            },
            Origin::Default => format!("default of `{key}`"),
        }
    }

    fn parse<T>(
        &self,
        key: &str,
        what: &str,
        f: impl Fn(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        let (raw, origin) = self.get(key);
        f(raw.trim()).ok_or_else(|| {
            ConfigError(format!(
                "{}: `{raw}` is not {what}",
                self.describe(key, origin)
            ))
        })
    }
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            toml::Value::String(s) => {
                out.insert(key, s.clone());
            }
            other => {
                out.insert(key, other.to_string());
            }
        }
    }
}

/// A configuration error: one line, naming the setting and its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Limits that protect the daemon from its callers.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub stream_max_bytes: u64,
    pub stream_max_chunks: u64,
    pub stream_idle_timeout: Duration,
    pub max_streams_per_connection: u32,
    pub max_streams: usize,
    pub max_inflight: usize,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// `None`: no limit.
    pub http2_max_local_error_reset_streams: Option<usize>,
}

/// The escalation matrix's parameters (SPEC "The escalation matrix").
#[derive(Clone, Debug)]
pub struct EscalationConfig {
    pub level2_hits: u32,
    pub level2_window: Duration,
    pub suspension: Duration,
    pub rate_limit: Duration,
    pub level3_subjects: u32,
    pub level3_window: Duration,
    /// Novel-attack detections (remote hits the local rules missed) within `level3_window` that
    /// raise the level-3 alert.
    pub level3_novel: u32,
    pub max_subjects: usize,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        EscalationConfig {
            level2_hits: 3,
            level2_window: Duration::from_secs(600),
            suspension: Duration::from_secs(900),
            rate_limit: Duration::from_secs(300),
            level3_subjects: 5,
            level3_window: Duration::from_secs(600),
            level3_novel: 10,
            max_subjects: 100_000,
        }
    }
}

/// Decision records (`records.*`).
#[derive(Clone, Debug)]
pub struct RecordsConfig {
    /// `None`: records are only log lines.
    pub dir: Option<PathBuf>,
    pub sync: bool,
    pub fail_closed: bool,
    pub commit_delay: Duration,
    pub queue: usize,
    pub segment_bytes: u64,
    pub retain: Duration,
    pub max_bytes: u64,
    pub reports_retain: Duration,
    pub samples: bool,
    pub samples_retain: Duration,
    /// Keep texts remote moderation flagged and the local rules passed (`records/novel`).
    pub novel_samples: bool,
}

/// Shared state in Redis (`redis.*`).
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `None`: state is local.
    pub url: Option<String>,
    pub timeout: Duration,
    pub required: bool,
    pub prefix: String,
}

/// A per-subject quota: `amount` per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaConfig {
    pub amount: u32,
    pub period: Duration,
}

/// Per-subject limits and budgets (`limits.*`).
#[derive(Clone, Debug, Default)]
pub struct SubjectLimits {
    pub input_requests: Option<QuotaConfig>,
    pub input_bytes: Option<QuotaConfig>,
    pub output_requests: Option<QuotaConfig>,
    pub output_bytes: Option<QuotaConfig>,
    /// Counted in Redis when it is configured.
    pub shared: bool,
    /// While Redis is unreachable: answer RATE_LIMIT (`true`) or count locally.
    pub closed_when_down: bool,
}

/// `N/PERIOD` (`600/1m`; N may be a size, `10MiB/1h`, when `size` is set) or `off`.
fn parse_quota(s: &str, size: bool) -> Option<Option<QuotaConfig>> {
    if s == "off" || s.is_empty() {
        return Some(None);
    }
    let (n, p) = s.split_once('/')?;
    let amount = if size {
        parse_size(n.trim())?
    } else {
        n.trim().parse::<u64>().ok()?
    };
    let amount = u32::try_from(amount).ok().filter(|a| *a > 0)?;
    let period = parse_nonzero_duration(p.trim())?;
    Some(Some(QuotaConfig { amount, period }))
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "true" | "on" | "yes" | "1" => Some(true),
        "false" | "off" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Which calls of a direction are sent to remote moderation (`moderation.input|output`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModerationPolicy {
    Never,
    /// Only when the request asks (`ClassifyRequest.moderate`).
    OnRequest,
    /// When the local verdict is ALLOW or FLAG, or the request asks.
    WhenUnsure,
    Always,
}

impl ModerationPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ModerationPolicy::Never => "never",
            ModerationPolicy::OnRequest => "on_request",
            ModerationPolicy::WhenUnsure => "when_unsure",
            ModerationPolicy::Always => "always",
        }
    }

    /// Whether a call with this local verdict (and this request's ask) is moderated.
    pub fn wants(self, local: Action, asked: bool) -> bool {
        match self {
            ModerationPolicy::Never => false,
            ModerationPolicy::OnRequest => asked,
            ModerationPolicy::WhenUnsure => asked || local <= Action::Flag,
            ModerationPolicy::Always => true,
        }
    }
}

/// Remote moderation (`moderation.*`).
#[derive(Clone, Debug)]
pub struct ModerationConfig {
    pub client: ClientConfig,
    /// Prompts (input, unspecified, tool arguments) and completions.
    pub input: ModerationPolicy,
    pub output: ModerationPolicy,
    pub deadline: Duration,
    pub mapping: Mapping,
    /// Rule ids (targets of the mapping) that fail closed, per direction.
    pub fail_closed_input: Vec<String>,
    pub fail_closed_output: Vec<String>,
    pub stream_window: usize,
    pub stream_strict: bool,
}

impl ModerationConfig {
    /// Whether any call can be moderated.
    pub fn enabled(&self) -> bool {
        self.input != ModerationPolicy::Never || self.output != ModerationPolicy::Never
    }
}

/// Applies `moderation.categories` (`category=TARGET[:ACTION][@THRESHOLD]`, comma-separated) to
/// the default table.
pub fn parse_categories(s: &str) -> Result<Mapping, String> {
    let mut m = Mapping::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (cat, rest) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not category=TARGET"))?;
        let cat = cat.trim();
        let (rest, threshold) = match rest.split_once('@') {
            Some((r, t)) => (
                r,
                t.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("`{t}` (category {cat}) is not a threshold like 0.5"))?,
            ),
            None => (
                rest,
                m.get(cat)
                    .map_or(crate::moderation::DEFAULT_THRESHOLD, |l| l.threshold),
            ),
        };
        let (target, action) = match rest.split_once(':') {
            Some((t, a)) => (
                t.trim(),
                Some(
                    Action::parse(a.trim())
                        .filter(|a| *a != Action::Sanitize)
                        .ok_or_else(|| {
                            format!("`{a}` (category {cat}) is not an action like flag or block (sanitize needs a span, which a remote hit lacks)")
                        })?,
                ),
            ),
            None => (rest.trim(), None),
        };
        let target = match target {
            "" => {
                return Err(format!(
                    "category {cat} has no target (a rule id, `flag` or `off`)"
                ))
            }
            "off" => {
                m.remove(cat);
                continue;
            }
            "flag" | "FLAG" | "MODERATION" => Target::Flag,
            r if r.starts_with("RULE-MIST-") || r.chars().all(|c| c.is_ascii_uppercase()) => {
                Target::Rule(r.to_string())
            }
            other => {
                return Err(format!(
                "`{other}` (category {cat}) is not a rule id like RULE-MIST-001, `flag` or `off`"
            ))
            }
        };
        m.set(CategoryRule {
            category: cat.to_string(),
            target,
            action,
            threshold,
        })?;
    }
    Ok(m)
}

/// A count within `lo..=hi`.
fn count_between(lo: u32, hi: u32) -> impl Fn(&str) -> Option<u32> {
    move |s| {
        parse_u64(s)
            .filter(|n| (u64::from(lo)..=u64::from(hi)).contains(n))
            .map(|n| n as u32)
    }
}

/// `off`, or a positive count.
fn parse_off_or_count(s: &str) -> Option<u64> {
    if s == "off" || s == "0" {
        Some(0)
    } else {
        parse_u64(s).filter(|n| *n > 0)
    }
}

/// A comma-separated list of rule ids.
fn parse_rule_list(s: &str) -> Option<Vec<String>> {
    let v: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    v.iter()
        .all(|r| {
            r.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
        })
        .then_some(v)
}

/// Tool-call authorization (AuthorizeToolCall, the Admin service).
#[derive(Clone, Debug)]
pub struct ToolConfig {
    pub policies: Option<PathBuf>,
    /// `true`: deny when nothing matched.
    pub default_deny: bool,
    pub approval_ttl: Duration,
    pub admin_tokens_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
}

/// Bounds of the protected set (ProtectText).
#[derive(Clone, Debug)]
pub struct ProtectConfig {
    pub max_texts: usize,
    pub max_bytes: usize,
    pub ttl: Duration,
    pub max_ttl: Duration,
}

/// Paths of the TLS certificate chain and key (PEM).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None`: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// `None`: no review console (the default).
    pub console_listen: Option<SocketAddr>,
    /// `None`: the bundled rulesets.
    pub rulesets: Option<PathBuf>,
    /// The learned tier's model.
    pub models: crate::load::Models,
    pub log_format: LogFormat,
    pub log_level: String,
    pub drain_deadline: Duration,
    pub limits: Limits,
    pub tls: Option<TlsFiles>,
    pub auth_tokens_file: Option<PathBuf>,
    pub subject_key_file: Option<PathBuf>,
    pub escalation: EscalationConfig,
    pub protect: ProtectConfig,
    pub tools: ToolConfig,
    pub records: RecordsConfig,
    pub redis: RedisConfig,
    pub subject_limits: SubjectLimits,
    pub moderation: ModerationConfig,
    /// Send systemd's readiness notification (`READY=1`, `STOPPING=1`) when `NOTIFY_SOCKET` is
    /// set. Not a setting: `mistguard serve` turns it on; daemons embedded in tests and the
    /// bench leave it off.
    pub notify_systemd: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_sources(&Sources::default()).expect("defaults are valid")
    }
}

impl Config {
    /// Builds and validates the configuration from its sources. Checks what can be checked
    /// without binding a port: values, that both TLS files are named, that named files exist.
    ///
    /// # Errors
    /// The first bad setting, as one line.
    pub fn from_sources(src: &Sources) -> Result<Config, ConfigError> {
        let addr = parse_listen;
        let metrics_listen = src.parse(
            "metrics_listen",
            "an address like 127.0.0.1:9464 (a host name only if it resolves to loopback, like localhost:9464) or `off`",
            |s| {
                if s == "off" {
                    Some(None)
                } else {
                    addr(s).map(Some)
                }
            },
        )?;
        let console_listen = src.parse(
            "console_listen",
            "an address like 127.0.0.1:9465 (a host name only if it resolves to loopback) or `off`",
            |s| {
                if s == "off" || s.is_empty() {
                    Some(None)
                } else {
                    addr(s).map(Some)
                }
            },
        )?;
        let path = |s: &str| Some((!s.is_empty()).then(|| PathBuf::from(s)));
        let rulesets = src.parse("rulesets", "a directory", |s| {
            if s == "bundled" || s.is_empty() {
                Some(None)
            } else {
                Some(Some(PathBuf::from(s)))
            }
        })?;
        if let Some(dir) = &rulesets {
            if !dir.is_dir() {
                let (_, origin) = src.get("rulesets");
                return Err(ConfigError(format!(
                    "{}: `{}` is not a directory",
                    src.describe("rulesets", origin),
                    dir.display()
                )));
            }
        }
        let models = src.parse("models", "`bundled`, `off` or a directory", |s| {
            Some(crate::load::Models::parse(s))
        })?;
        if let crate::load::Models::Dir(dir) = &models {
            if !dir.is_dir() {
                let (_, origin) = src.get("models");
                return Err(ConfigError(format!(
                    "{}: `{}` is not a directory",
                    src.describe("models", origin),
                    dir.display()
                )));
            }
        }
        let nonzero_u64 = |s: &str| parse_u64(s).filter(|n| *n > 0);
        let limits = Limits {
            max_message_bytes: src.parse(
                "max_message_bytes",
                "a size between 1KiB and 64MiB",
                |s| {
                    parse_size(s)
                        .filter(|n| (1024..=64 << 20).contains(n))
                        .map(|n| n as usize)
                },
            )?,
            stream_max_bytes: src.parse("stream_max_bytes", "a size like 64MiB", |s| {
                parse_size(s).filter(|n| *n > 0)
            })?,
            stream_max_chunks: src.parse("stream_max_chunks", "a positive count", nonzero_u64)?,
            stream_idle_timeout: src.parse(
                "stream_idle_timeout",
                "a duration like 60s",
                parse_nonzero_duration,
            )?,
            max_streams_per_connection: src.parse(
                "max_streams_per_connection",
                "a count between 1 and 65535",
                count_between(1, 65535),
            )?,
            max_streams: src.parse("max_streams", "a positive count", |s| {
                nonzero_u64(s).map(|n| n as usize)
            })?,
            max_inflight: src.parse("max_inflight", "a positive count", |s| {
                nonzero_u64(s).map(|n| n as usize)
            })?,
            http2_keepalive_interval: src.parse(
                "http2_keepalive_interval",
                "a duration like 30s",
                parse_nonzero_duration,
            )?,
            http2_keepalive_timeout: src.parse(
                "http2_keepalive_timeout",
                "a duration like 10s",
                parse_nonzero_duration,
            )?,
            http2_max_local_error_reset_streams: src.parse(
                "http2_max_local_error_reset_streams",
                "a count (0: no limit)",
                |s| parse_u64(s).map(|n| (n > 0).then_some(n as usize)),
            )?,
        };
        let tls_cert = src.parse("tls_cert", "a path", path)?;
        let tls_key = src.parse("tls_key", "a path", path)?;
        let tls = match (tls_cert, tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                for (k, p) in [("tls_cert", &cert), ("tls_key", &key)] {
                    if !p.is_file() {
                        let (_, origin) = src.get(k);
                        return Err(ConfigError(format!(
                            "{}: `{}` is not a readable file",
                            src.describe(k, origin),
                            p.display()
                        )));
                    }
                }
                Some(TlsFiles { cert, key })
            }
            (Some(_), None) | (None, Some(_)) => return Err(ConfigError(
                "TLS needs both `tls_cert` and `tls_key` (MISTGUARD_TLS_CERT, MISTGUARD_TLS_KEY)"
                    .into(),
            )),
        };
        let auth_tokens_file = src.parse("auth_tokens_file", "a path", path)?;
        let subject_key_file = src.parse("subject_key_file", "a path", path)?;
        let escalation = EscalationConfig {
            level2_hits: src.parse(
                "escalation.level2_hits",
                "a count between 1 and 1000",
                count_between(1, 1000),
            )?,
            level2_window: src.parse(
                "escalation.level2_window",
                "a duration like 10m",
                parse_nonzero_duration,
            )?,
            suspension: src.parse(
                "escalation.suspension",
                "a duration like 15m",
                parse_nonzero_duration,
            )?,
            rate_limit: src.parse(
                "escalation.rate_limit",
                "a duration like 5m",
                parse_duration,
            )?,
            level3_subjects: src.parse(
                "escalation.level3_subjects",
                "a count between 1 and 100000",
                count_between(1, 100_000),
            )?,
            level3_window: src.parse(
                "escalation.level3_window",
                "a duration like 10m",
                parse_nonzero_duration,
            )?,
            level3_novel: src.parse(
                "escalation.level3_novel",
                "a count between 1 and 1000000",
                count_between(1, 1_000_000),
            )?,
            max_subjects: src.parse("escalation.max_subjects", "a positive count", |s| {
                nonzero_u64(s).map(|n| n as usize)
            })?,
        };
        let tools = ToolConfig {
            policies: src.parse("policies", "a directory", path)?,
            default_deny: src.parse("default_decision", "`allow` or `deny`", |s| match s {
                "allow" => Some(false),
                "deny" => Some(true),
                _ => None,
            })?,
            approval_ttl: src.parse(
                "approval_ttl",
                "a duration like 15m",
                parse_nonzero_duration,
            )?,
            admin_tokens_file: src.parse("admin_tokens_file", "a path", path)?,
            data_dir: src.parse("data_dir", "a directory", path)?,
        };
        let protect = ProtectConfig {
            max_texts: src.parse("protect.max_texts", "a positive count", |s| {
                nonzero_u64(s).map(|n| n as usize)
            })?,
            max_bytes: src.parse("protect.max_bytes", "a size like 64MiB", |s| {
                parse_size(s).filter(|n| *n > 0).map(|n| n as usize)
            })?,
            ttl: src.parse("protect.ttl", "a duration like 24h", parse_nonzero_duration)?,
            max_ttl: src.parse(
                "protect.max_ttl",
                "a duration like 168h",
                parse_nonzero_duration,
            )?,
        };
        let records =
            RecordsConfig {
                dir: src.parse("records.dir", "a directory", path)?,
                sync: src.parse("records.durability", "`sync` or `async`", |s| match s {
                    "sync" => Some(true),
                    "async" => Some(false),
                    _ => None,
                })?,
                fail_closed: src.parse("records.on_error", "`fail_closed` or `continue`", |s| {
                    match s {
                        "fail_closed" => Some(true),
                        "continue" => Some(false),
                        _ => None,
                    }
                })?,
                commit_delay: src.parse(
                    "records.commit_delay",
                    "a duration like 1ms (at most 100ms)",
                    |s| parse_duration(s).filter(|d| *d <= Duration::from_millis(100)),
                )?,
                queue: src.parse("records.queue", "a positive count", |s| {
                    nonzero_u64(s).map(|n| n as usize)
                })?,
                segment_bytes: src.parse("records.segment_bytes", "a size like 64MiB", |s| {
                    parse_size(s).filter(|n| *n >= 4096)
                })?,
                retain: src.parse(
                    "records.retain",
                    "a duration like 30d",
                    parse_nonzero_duration,
                )?,
                max_bytes: src.parse("records.max_bytes", "a size like 8GiB", |s| {
                    parse_size(s).filter(|n| *n > 0)
                })?,
                reports_retain: src.parse(
                    "records.reports_retain",
                    "a duration like 365d",
                    parse_nonzero_duration,
                )?,
                samples: src.parse("records.samples", "`on` or `off`", parse_bool)?,
                samples_retain: src.parse(
                    "records.samples_retain",
                    "a duration like 30d",
                    parse_nonzero_duration,
                )?,
                novel_samples: src.parse("records.novel_samples", "`on` or `off`", parse_bool)?,
            };
        let redis = RedisConfig {
            url: src.parse("redis.url", "a URL like redis://127.0.0.1:6379/0", |s| {
                if s.is_empty() {
                    Some(None)
                } else if s.starts_with("redis://") || s.starts_with("rediss://") {
                    Some(Some(s.to_string()))
                } else {
                    None
                }
            })?,
            timeout: src.parse(
                "redis.timeout",
                "a duration like 50ms",
                parse_nonzero_duration,
            )?,
            required: src.parse("redis.required", "`true` or `false`", parse_bool)?,
            prefix: src.parse("redis.prefix", "a key prefix", |s| {
                (s.len() <= 64 && !s.contains(char::is_whitespace)).then(|| s.to_string())
            })?,
        };
        let subject_limits = SubjectLimits {
            input_requests: src.parse(
                "limits.input_requests",
                "`off` or N/PERIOD like 600/1m",
                |s| parse_quota(s, false),
            )?,
            input_bytes: src.parse(
                "limits.input_bytes",
                "`off` or SIZE/PERIOD like 10MiB/1h",
                |s| parse_quota(s, true),
            )?,
            output_requests: src.parse(
                "limits.output_requests",
                "`off` or N/PERIOD like 600/1m",
                |s| parse_quota(s, false),
            )?,
            output_bytes: src.parse(
                "limits.output_bytes",
                "`off` or SIZE/PERIOD like 50MiB/1h",
                |s| parse_quota(s, true),
            )?,
            shared: src.parse("limits.scope", "`shared` or `local`", |s| match s {
                "shared" => Some(true),
                "local" => Some(false),
                _ => None,
            })?,
            closed_when_down: src.parse("limits.when_redis_down", "`local` or `closed`", |s| {
                match s {
                    "local" => Some(false),
                    "closed" => Some(true),
                    _ => None,
                }
            })?,
        };
        let moderation = moderation_config(src)?;
        if redis.url.is_some() && subject_key_file.is_none() {
            return Err(ConfigError(
                "redis.url needs subject_key_file: replicas that share state must hash subjects with the same key (give each the same file of 32 or more random bytes)".into(),
            ));
        }
        if console_listen.is_some() && tools.admin_tokens_file.is_none() {
            return Err(ConfigError(
                "console_listen needs admin_tokens_file: the review console is only for holders of an admin token".into(),
            ));
        }
        if protect.ttl > protect.max_ttl {
            return Err(ConfigError(format!(
                "protect.ttl ({}s) is longer than protect.max_ttl ({}s)",
                protect.ttl.as_secs(),
                protect.max_ttl.as_secs()
            )));
        }
        Ok(Config {
            listen: src.parse(
                "listen",
                "an address like 127.0.0.1:50051 (a host name only if it resolves to loopback, like localhost:50051)",
                addr,
            )?,
            metrics_listen,
            console_listen,
            rulesets,
            models,
            log_format: src.parse("log_format", "`text` or `json`", |s| match s {
                "text" => Some(LogFormat::Text),
                "json" => Some(LogFormat::Json),
                _ => None,
            })?,
            log_level: src.parse(
                "log_level",
                "a log filter: a level (error, warn, info, debug, trace, off) or target=level, comma-separated",
                parse_log_filter,
            )?,
            drain_deadline: src.parse(
                "drain_deadline",
                "a duration like 20s",
                parse_nonzero_duration,
            )?,
            limits,
            tls,
            auth_tokens_file,
            subject_key_file,
            escalation,
            protect,
            tools,
            records,
            redis,
            subject_limits,
            moderation,
            notify_systemd: false,
        })
    }
}

/// A base URL for the moderation API: `http(s)://HOST[:PORT][/PATH]`, with a host, and without
/// credentials, a query or a fragment (the client refuses those too; checked here so
/// `--check-config` does).
fn parse_base_url(s: &str) -> Option<String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let ok = !authority.is_empty()
        && !authority.starts_with(':')
        && !authority.contains('@')
        && !s.contains(['?', '#'])
        && !s.contains(char::is_whitespace);
    ok.then(|| s.trim_end_matches('/').to_string())
}

/// A URL with its password (`redis://user:secret@host`) replaced by `***`.
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                // `redis://secret@host`: the userinfo alone may be the password.
                format!("{scheme}://***@{host}{path}")
            }
        }
        None => url.to_string(),
    }
}

/// `moderation.*`, with the keys of `MISTRAL_API_KEY(S)`.
fn moderation_config(src: &Sources) -> Result<ModerationConfig, ConfigError> {
    let policy = |key: &str| -> Result<Option<ModerationPolicy>, ConfigError> {
        src.parse(
            key,
            "`auto`, `never`, `on_request`, `when_unsure` or `always`",
            |s| match s {
                "auto" => Some(None),
                "never" => Some(Some(ModerationPolicy::Never)),
                "on_request" => Some(Some(ModerationPolicy::OnRequest)),
                "when_unsure" => Some(Some(ModerationPolicy::WhenUnsure)),
                "always" => Some(Some(ModerationPolicy::Always)),
                _ => None,
            },
        )
    };
    let keys_file = src.parse("moderation.keys_file", "a file path", |s| {
        Some((!s.is_empty()).then(|| PathBuf::from(s)))
    })?;
    if let Some(f) = &keys_file {
        if !f.is_file() {
            let (_, origin) = src.get("moderation.keys_file");
            return Err(ConfigError(format!(
                "{}: `{}` is not a readable file",
                src.describe("moderation.keys_file", origin),
                f.display()
            )));
        }
    }
    let keys = KeySource {
        file: keys_file,
        ..src.api_keys.clone()
    };
    let have_keys = keys.single.is_some()
        || keys
            .list
            .as_deref()
            .is_some_and(|l| l.split(',').any(|k| !k.trim().is_empty()))
        || keys.file.is_some();
    let auto = if have_keys {
        ModerationPolicy::WhenUnsure
    } else {
        ModerationPolicy::Never
    };
    let input = policy("moderation.input")?;
    let output = policy("moderation.output")?;
    for (key, p) in [("moderation.input", input), ("moderation.output", output)] {
        if !have_keys && p.is_some_and(|p| p != ModerationPolicy::Never) {
            let (_, origin) = src.get(key);
            return Err(ConfigError(format!(
                "{} asks for remote moderation, but no API key is set: set MISTRAL_API_KEY, MISTRAL_API_KEYS or moderation.keys_file",
                src.describe(key, origin)
            )));
        }
    }
    let (raw, origin) = src.get("moderation.categories");
    let mapping = parse_categories(&raw).map_err(|e| {
        ConfigError(format!(
            "{}: {e}",
            src.describe("moderation.categories", origin)
        ))
    })?;
    let fail_closed = |key: &str| -> Result<Vec<String>, ConfigError> {
        let v = src.parse(key, "a comma-separated list of rule ids", parse_rule_list)?;
        let targets: Vec<&str> = mapping.rules().iter().map(|r| r.rule_id()).collect();
        if let Some(bad) = v.iter().find(|r| !targets.contains(&r.as_str())) {
            let (_, origin) = src.get(key);
            return Err(ConfigError(format!(
                "{}: {bad} is not a rule the category table maps to (it maps to {})",
                src.describe(key, origin),
                {
                    let mut t = targets.clone();
                    t.sort_unstable();
                    t.dedup();
                    t.join(", ")
                }
            )));
        }
        Ok(v)
    };
    let minutes = |key: &str| -> Result<u32, ConfigError> {
        src.parse(key, "`off` or a count per minute", |s| {
            parse_off_or_count(s).and_then(|n| u32::try_from(n).ok())
        })
    };
    let url = src.parse(
        "moderation.url",
        "an http:// or https:// base URL with a host and no credentials, query or fragment",
        parse_base_url,
    )?;
    let client = ClientConfig {
        url,
        model: src.parse("moderation.model", "a model name", |s| {
            (!s.is_empty() && s.len() <= 128 && !s.contains(char::is_whitespace))
                .then(|| s.to_string())
        })?,
        keys,
        attempt_timeout: src.parse(
            "moderation.attempt_timeout",
            "a duration like 2s",
            parse_nonzero_duration,
        )?,
        call_timeout: src.parse(
            "moderation.call_timeout",
            "a duration like 5s",
            parse_nonzero_duration,
        )?,
        retries: src.parse("moderation.retries", "a count between 0 and 10", |s| {
            parse_u64(s).filter(|n| *n <= 10).map(|n| n as u32)
        })?,
        retry_budget: src.parse(
            "moderation.retry_budget",
            "a fraction between 0 and 1",
            |s| s.parse::<f64>().ok().filter(|f| (0.0..=1.0).contains(f)),
        )?,
        batch_size: src.parse("moderation.batch_size", "a count between 1 and 128", |s| {
            count_between(1, 128)(s).map(|n| n as usize)
        })?,
        batch_window: src.parse(
            "moderation.batch_window",
            "a duration like 2ms (0 sends at once)",
            |s| parse_duration(s).filter(|d| *d <= Duration::from_secs(1)),
        )?,
        requests_per_minute: minutes("moderation.requests_per_minute")?,
        tokens_per_minute: minutes("moderation.tokens_per_minute")?,
        budget_tokens_per_hour: src.parse(
            "moderation.budget_tokens_per_hour",
            "`off` or a count of tokens",
            parse_off_or_count,
        )?,
        subject_budget_tokens_per_hour: src.parse(
            "moderation.subject_budget_tokens_per_hour",
            "`off` or a count of tokens",
            parse_off_or_count,
        )?,
        cache_entries: src.parse("moderation.cache_entries", "a count (0: no cache)", |s| {
            parse_u64(s).map(|n| n as usize)
        })?,
        cache_ttl: src.parse(
            "moderation.cache_ttl",
            "a duration like 1h",
            parse_nonzero_duration,
        )?,
        breaker_failures: src.parse(
            "moderation.breaker_failures",
            "a count between 1 and 1000",
            count_between(1, 1000),
        )?,
        breaker_cooldown: src.parse(
            "moderation.breaker_cooldown",
            "a duration like 30s",
            parse_nonzero_duration,
        )?,
        key_cooldown: src.parse(
            "moderation.key_cooldown",
            "a duration like 5m",
            parse_nonzero_duration,
        )?,
        backoff_base: Duration::from_millis(500),
    };
    Ok(ModerationConfig {
        input: input.unwrap_or(auto),
        output: output.unwrap_or(auto),
        deadline: src.parse(
            "moderation.deadline",
            "a duration like 200ms",
            parse_nonzero_duration,
        )?,
        fail_closed_input: fail_closed("moderation.fail_closed_input")?,
        fail_closed_output: fail_closed("moderation.fail_closed_output")?,
        mapping,
        stream_window: src.parse(
            "moderation.stream_window",
            "a size between 64 and 64KiB",
            |s| {
                parse_size(s)
                    .filter(|n| (64..=65536).contains(n))
                    .map(|n| n as usize)
            },
        )?,
        stream_strict: src.parse(
            "moderation.stream_mode",
            "`background` or `strict`",
            |s| match s {
                "background" => Some(false),
                "strict" => Some(true),
                _ => None,
            },
        )?,
        client,
    })
}

/// A listen address: `IP:PORT`, or `HOST:PORT` where every address the host name resolves to is
/// loopback (`localhost:50051`; `localhost` itself is loopback without a lookup, RFC 6761). A
/// host name that may reach another interface is refused: exposing the daemon takes an explicit
/// IP address. The first IPv4 address is bound when there are several.
pub fn parse_listen(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid_name {
        return None;
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Some(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .ok()?
        .collect();
    if addrs.is_empty() || !addrs.iter().all(|a| a.ip().is_loopback()) {
        return None;
    }
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
}

/// A `tracing` filter whose every directive sets a level: `info`, `warn,mistguard::decision=debug`.
/// `EnvFilter` itself takes a bare word as a target enabled at every level, so a misspelt level
/// (`infoo`) would turn every other line off, decision records included; it is refused here.
pub fn parse_log_filter(s: &str) -> Option<String> {
    use std::str::FromStr;
    if s.is_empty() {
        return None;
    }
    for directive in s.split(',') {
        let directive = directive.trim();
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, l)| l)
            .trim();
        // (`LevelFilter` reads an empty level as ERROR.)
        if level.is_empty() {
            return None;
        }
        tracing_subscriber::filter::LevelFilter::from_str(level).ok()?;
    }
    tracing_subscriber::EnvFilter::try_new(s).ok()?;
    Some(s.to_string())
}

fn parse_u64(s: &str) -> Option<u64> {
    s.replace('_', "").parse().ok()
}

/// `1048576`, `64KiB`, `1MiB`, `1GiB` (also `K`, `M`, `G`, `KB`, `MB`, `GB`: all binary).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n = parse_u64(num)?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// `500ms`, `20s`, `10m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" | "min" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        "d" => n.checked_mul(86400).map(Duration::from_secs),
        _ => None,
    }
}

fn parse_nonzero_duration(s: &str) -> Option<Duration> {
    parse_duration(s).filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dump_masks_secrets() {
        let src = Sources {
            flags: flags(&[("redis.url", "redis://app:hunter2-canary@10.0.0.5:6379/0")]),
            ..Default::default()
        }
        .with_env([
            ("MISTRAL_API_KEY", "sk-canary-one"),
            ("MISTRAL_API_KEYS", "sk-canary-two, sk-canary-three"),
        ]);
        let dump = src.effective();
        assert!(!dump.contains("hunter2-canary"), "{dump}");
        assert!(!dump.contains("sk-canary"), "{dump}");
        assert!(dump.contains("redis.url = \"redis://app:***@10.0.0.5:6379/0\"  # --redis-url"));
        assert!(dump.contains("# MISTRAL_API_KEYS: set, 2 keys (masked)"));
        assert!(dump.contains("moderation.deadline = \"200ms\"  # default"));
        assert!(!format!("{src:?}").contains("sk-canary"));
        assert_eq!(mask_url_password("redis://tok@h/0"), "redis://***@h/0");
        assert_eq!(mask_url_password("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn moderation_settings() {
        // No key: `auto` is never; asking for more is refused.
        let c = Config::from_sources(&Sources::default()).unwrap();
        assert!(!c.moderation.enabled());
        let e = Config::from_sources(&Sources {
            flags: flags(&[("moderation.input", "always")]),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("no API key"), "{e}");
        // A key: `auto` is when_unsure.
        let keyed = |f: &[(&str, &str)]| {
            Config::from_sources(
                &Sources {
                    flags: flags(f),
                    ..Default::default()
                }
                .with_env([("MISTRAL_API_KEY", "k")]),
            )
        };
        let c = keyed(&[]).unwrap();
        assert_eq!(c.moderation.input, ModerationPolicy::WhenUnsure);
        assert_eq!(c.moderation.output, ModerationPolicy::WhenUnsure);
        assert_eq!(c.moderation.deadline, Duration::from_millis(200));
        let c = keyed(&[
            ("moderation.output", "always"),
            (
                "moderation.categories",
                "sexual=RULE-MIST-005@0.7, health=off, jailbreaking=RULE-MIST-009:block",
            ),
            ("moderation.fail_closed_output", "RULE-MIST-005,MODERATION"),
        ])
        .unwrap();
        let m = &c.moderation.mapping;
        assert_eq!(m.get("sexual").unwrap().rule_id(), "RULE-MIST-005");
        assert_eq!(m.get("sexual").unwrap().threshold, 0.7);
        assert!(m.get("health").is_none());
        assert_eq!(m.get("jailbreaking").unwrap().action, Some(Action::Block));
        assert_eq!(
            c.moderation.fail_closed_output,
            ["RULE-MIST-005", "MODERATION"]
        );
        for (k, v, want) in [
            (
                "moderation.fail_closed_input",
                "RULE-MIST-002",
                "not a rule the category table maps to",
            ),
            (
                "moderation.categories",
                "sexual=nonsense",
                "is not a rule id",
            ),
            (
                "moderation.categories",
                "sexual=flag@2",
                "not between 0 and 1",
            ),
            ("moderation.categories", "sexual", "category=TARGET"),
            ("moderation.input", "sometimes", "when_unsure"),
            ("moderation.url", "ftp://x", "URL"),
            (
                "moderation.url",
                "https://user:pw@api.mistral.ai",
                "credentials",
            ),
            ("moderation.url", "https://api.mistral.ai/?x=1", "query"),
            ("moderation.url", "https://", "host"),
            ("moderation.categories", "sexual=", "no target"),
            ("moderation.stream_mode", "eager", "strict"),
        ] {
            let e = keyed(&[(k, v)]).unwrap_err();
            assert!(e.0.contains(want), "{k}={v}: {e}");
        }
    }

    fn flags(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_loopback_and_bounded() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.limits.max_message_bytes, 1 << 20);
        assert_eq!(c.drain_deadline, Duration::from_secs(20));
        assert_eq!(c.escalation.level2_hits, 3);
        assert_eq!(c.escalation.suspension, Duration::from_secs(900));
        assert!(c.rulesets.is_none() && c.tls.is_none() && c.auth_tokens_file.is_none());
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let file = "listen = \"127.0.0.1:1\"\nmax_inflight = 7\ndrain_deadline = \"3s\"\n[escalation]\nlevel2_hits = 9\n";
        let src = Sources {
            flags: flags(&[("listen", "127.0.0.1:3")]),
            ..Default::default()
        }
        .with_env([
            ("MISTGUARD_LISTEN", "127.0.0.1:2"),
            ("MISTGUARD_MAX_INFLIGHT", "8"),
            ("HOME", "/x"),
        ])
        .with_file_text(Path::new("m.toml"), file)
        .unwrap();
        let c = Config::from_sources(&src).unwrap();
        assert_eq!(c.listen.port(), 3);
        assert_eq!(c.limits.max_inflight, 8);
        assert_eq!(c.drain_deadline, Duration::from_secs(3));
        assert_eq!(c.escalation.level2_hits, 9);
    }

    #[test]
    fn bad_values_name_setting_and_origin() {
        let src = Sources::default().with_env([("MISTGUARD_MAX_MESSAGE_BYTES", "lots")]);
        let e = Config::from_sources(&src).unwrap_err().to_string();
        assert_eq!(
            e,
            "MISTGUARD_MAX_MESSAGE_BYTES: `lots` is not a size between 1KiB and 64MiB"
        );
        assert!(!e.contains('\n'));

        let src = Sources {
            flags: flags(&[("drain_deadline", "0s")]),
            ..Default::default()
        };
        let e = Config::from_sources(&src).unwrap_err().to_string();
        assert!(e.starts_with("--drain-deadline:"), "{e}");

        let src = Sources::default()
            .with_file_text(Path::new("m.toml"), "[escalation]\nsuspension = \"soon\"\n")
            .unwrap();
        let e = Config::from_sources(&src).unwrap_err().to_string();
        assert!(e.starts_with("m.toml: `escalation.suspension`"), "{e}");
    }

    #[test]
    fn unknown_file_keys_and_half_tls_are_refused() {
        let e = Sources::default()
            .with_file_text(Path::new("m.toml"), "lisen = \"x\"\n")
            .unwrap_err();
        assert!(e.0.contains("unknown setting `lisen`"), "{e}");
        let e = Sources::default()
            .with_file_text(Path::new("m.toml"), "listen = ")
            .unwrap_err();
        assert!(e.0.starts_with("m.toml: "), "{e}");
        let src = Sources {
            flags: flags(&[("tls_cert", "/etc/hostname")]),
            ..Default::default()
        };
        assert!(Config::from_sources(&src)
            .unwrap_err()
            .0
            .contains("both `tls_cert` and `tls_key`"));
    }

    #[test]
    fn missing_rulesets_dir_is_refused() {
        let src = Sources {
            flags: flags(&[("rulesets", "/nonexistent/mistguard")]),
            ..Default::default()
        };
        let e = Config::from_sources(&src).unwrap_err().0;
        assert_eq!(e, "--rulesets: `/nonexistent/mistguard` is not a directory");
    }

    #[test]
    fn a_log_filter_must_set_levels() {
        for ok in [
            "info",
            "INFO",
            "warn,mistguard::decision=debug",
            "info,mistguard=trace",
            "off",
        ] {
            assert_eq!(parse_log_filter(ok).as_deref(), Some(ok), "{ok}");
        }
        // `infoo` parses as a target at every level, which silences everything else.
        for bad in [
            "infoo",
            "",
            "info,mistguard",
            "mistguard=loud",
            "info,,debug",
            "mistguard=",
        ] {
            assert_eq!(parse_log_filter(bad), None, "{bad:?}");
        }
        let src = Sources {
            flags: flags(&[("log_level", "infoo")]),
            ..Default::default()
        };
        let e = Config::from_sources(&src).unwrap_err().0;
        assert!(
            e.starts_with("--log-level: `infoo` is not a log filter"),
            "{e}"
        );
    }

    #[test]
    fn listen_accepts_loopback_host_names_only() {
        assert_eq!(
            parse_listen("localhost:50051"),
            Some("127.0.0.1:50051".parse().unwrap())
        );
        assert_eq!(parse_listen("[::1]:7"), Some("[::1]:7".parse().unwrap()));
        assert_eq!(parse_listen("localhost"), None);
        assert_eq!(parse_listen("localhost:http"), None);
        assert_eq!(parse_listen("bad host:1"), None);
        // Not loopback (does not resolve here either): refused, with the reason in the message.
        let src = Sources {
            flags: flags(&[("listen", "mistguard.invalid:50051")]),
            ..Default::default()
        };
        let e = Config::from_sources(&src).unwrap_err().0;
        assert!(e.contains("only if it resolves to loopback"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("64 KiB"), Some(64 << 10));
        assert_eq!(parse_size("1_000"), Some(1000));
        assert_eq!(parse_size("1 parsec"), None);
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("-1s"), None);
    }

    #[test]
    fn metrics_can_be_turned_off() {
        let src = Sources {
            flags: flags(&[("metrics_listen", "off")]),
            ..Default::default()
        };
        assert_eq!(Config::from_sources(&src).unwrap().metrics_listen, None);
    }

    #[test]
    fn env_and_flag_names_follow_keys() {
        let s = SETTINGS
            .iter()
            .find(|s| s.key == "escalation.level2_hits")
            .unwrap();
        assert_eq!(s.env_var(), "MISTGUARD_ESCALATION_LEVEL2_HITS");
        assert_eq!(s.flag(), "--escalation-level2-hits");
    }
}
