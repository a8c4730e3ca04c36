//! The `mistguard` command line: check rulesets, classify text, evaluate on a corpus, serve.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use mistguard::{ClassifyOptions, Engine, LoadError};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "mistguard",
    version,
    about = "Streaming content-safety classification for Mistral-powered applications",
    long_about = "Classifies text against the RULE-MIST safety rules (compiled per language into \
                  multi-pattern automata) and answers with an action: allow, flag, warn, sanitize, \
                  restrict, rate_limit, block or hard_block.\n\nThe bundled rulesets are embedded in \
                  the binary; --rulesets DIR uses a directory of TOML files instead."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the rulesets `serve` would load and print what they compile to (exit 1 on the
    /// first error in them, 64 on bad configuration). They are found as `serve` finds them:
    /// --rulesets, else MISTGUARD_RULESETS, else `rulesets` in the --config file (or
    /// MISTGUARD_CONFIG), else the bundled ones.
    Check {
        /// Directory of rule files (the same as --rulesets).
        #[arg(value_name = "DIR", conflicts_with = "rulesets")]
        dir: Option<PathBuf>,
        /// Rulesets directory, or `bundled` (also MISTGUARD_RULESETS).
        #[arg(long, value_name = "DIR")]
        rulesets: Option<String>,
        /// Learned-tier model directory, `bundled` or `off` (also MISTGUARD_MODELS).
        #[arg(long, value_name = "DIR")]
        models: Option<String>,
        /// The daemon's TOML configuration file (also MISTGUARD_CONFIG); its settings are
        /// validated too.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Also validate a tool-call policies directory (else the one the configuration names,
        /// if any).
        #[arg(long, value_name = "DIR")]
        policies: Option<PathBuf>,
    },
    /// Decide one tool call as AuthorizeToolCall would (policies and the content scan of the
    /// arguments; no approvals) and print the decision as JSON. Exit 0 for allow, 3 for deny, 4
    /// for require_approval, 1 when the policies do not load, 64 for bad input.
    Authorize {
        /// Tool-call policies directory (YAML; see policies/README.md).
        #[arg(long, value_name = "DIR")]
        policies: Option<PathBuf>,
        /// The function name the model chose.
        #[arg(long)]
        tool: String,
        /// The arguments: a JSON object.
        #[arg(long, value_name = "JSON", default_value = "{}")]
        args: String,
        /// The caller's context: a JSON object (environment, user_role, ...).
        #[arg(long, value_name = "JSON", default_value = "{}")]
        context: String,
        /// The answer when no rule matches: allow or deny.
        #[arg(long, default_value = "allow", value_parser = ["allow", "deny"])]
        default_decision: String,
        /// Rulesets directory for the content scan (default: bundled).
        #[arg(long, env = "MISTGUARD_RULESETS")]
        rulesets: Option<PathBuf>,
        /// Learned-tier model directory, `bundled` (the default) or `off`.
        #[arg(long, env = "MISTGUARD_MODELS", value_name = "DIR")]
        models: Option<String>,
    },
    /// List, approve or deny the tool-call approvals of a running daemon (its Admin service).
    Approvals(mistguard::daemon::admin_cli::ApprovalsArgs),
    /// List the Level-2 review queue of a running daemon, or lift a suspension (its Admin
    /// service).
    Reviews(mistguard::daemon::admin_cli::ReviewsArgs),
    /// Classify one text (from --text or standard input) and print the verdict as JSON.
    Classify {
        /// The text; read from standard input when omitted.
        #[arg(long)]
        text: Option<String>,
        /// Language hint (ISO 639-1, e.g. fr); detected when omitted.
        #[arg(long)]
        lang: Option<String>,
        /// Rulesets directory (default: bundled).
        #[arg(long, env = "MISTGUARD_RULESETS")]
        rulesets: Option<PathBuf>,
        /// Learned-tier model directory (holding mistguard-model.bin), `bundled` (the default)
        /// or `off` (the rules alone).
        #[arg(long, env = "MISTGUARD_MODELS", value_name = "DIR")]
        models: Option<String>,
        /// Feed the text as a stream in chunks of N bytes and print each step (at char
        /// boundaries), with the text each step releases (`released_text`).
        #[arg(long, value_name = "N")]
        chunk: Option<usize>,
        /// Which way the text travels: `input` (a prompt), `output` (a completion: active
        /// markup is scanned for, PII and secrets get typed placeholders) or `unspecified`
        /// (treated as a prompt).
        #[arg(long, default_value = "unspecified", value_parser = ["input", "output", "unspecified"])]
        direction: String,
    },
    /// Run a labelled JSONL corpus through the engine: per-rule precision and recall, benign
    /// false-positive rates overall, per language and on hard negatives.
    Eval {
        /// The corpus (JSON lines with text, lang, labels, alt_labels, meta).
        #[arg(long)]
        corpus: PathBuf,
        /// Rulesets directory (default: bundled).
        #[arg(long, env = "MISTGUARD_RULESETS")]
        rulesets: Option<PathBuf>,
        /// Learned-tier model directory (holding mistguard-model.bin), `bundled` (the default)
        /// or `off` (the rules alone).
        #[arg(long, env = "MISTGUARD_MODELS", value_name = "DIR")]
        models: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Only show this rule's row in the table.
        #[arg(long)]
        rule: Option<String>,
        /// List the false positives of this rule (id, lang, triggers, text).
        #[arg(long, value_name = "RULE")]
        show_fp: Option<String>,
        /// List the misses of this rule.
        #[arg(long, value_name = "RULE")]
        show_fn: Option<String>,
        /// Pass each item's `lang` as the language hint instead of detecting it.
        #[arg(long)]
        lang_hint: bool,
    },
    /// Print the normalized form of each JSON line's `text` on standard input, one JSON string a
    /// line (what the word view and the learned tier's trainer see).
    #[command(hide = true)]
    Normalize,
    /// Verify the hash chain of the decision records, or query them.
    ///
    /// The daemon writes its decisions (and RULE-MIST-005 reports, and opt-in samples) as
    /// hash-chained JSON lines in segments named <stream>-<seq>.jsonl; these commands read them.
    Records(mistguard::io::records::cli::RecordsArgs),
    /// Ask Mistral's moderation API once, with the settings `serve` would use, and print the raw
    /// categories next to the hits the category table maps them to (for checking a key and the
    /// mapping). Exit 0 when the API answered, 1 when it did not, 64 on bad configuration.
    Moderate(Box<mistguard::daemon::moderate_cli::ModerateArgs>),
    /// Run the gRPC daemon (see docs/DAEMON.md).
    Serve(Box<mistguard::daemon::ServeArgs>),
    /// Load-test the daemon over real gRPC on 127.0.0.1 and print a table.
    Bench(mistguard::daemon::BenchArgs),
}

/// The engine of `rulesets` (bundled when `None`) and `models` (bundled when `None`); a load
/// error is printed in one line and becomes exit status 1.
fn load(rulesets: Option<&PathBuf>, models: Option<&str>) -> Result<Arc<Engine>, ExitCode> {
    // `bundled` means the same as for `serve` (MISTGUARD_RULESETS=bundled).
    let dir = rulesets.filter(|d| d.as_os_str() != "bundled");
    let models = mistguard::load::Models::parse(models.unwrap_or("bundled"));
    let loaded: Result<Engine, LoadError> =
        mistguard::load::engine(dir.map(|d| d.as_path()), &models);
    loaded.map(Arc::new).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = match Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => {
            // A bad flag of `serve` is bad configuration like any other: one line, status 64.
            let serve = std::env::args_os().nth(1).is_some_and(|a| a == "serve");
            if serve && e.use_stderr() {
                let msg = e.render().to_string();
                let first = msg.lines().next().unwrap_or_default();
                eprintln!(
                    "mistguard: configuration: {} (see mistguard serve --help)",
                    first.trim_start_matches("error: ")
                );
                return ExitCode::from(mistguard::daemon::EXIT_CONFIG);
            }
            e.exit()
        }
    };
    if !matches!(
        cli.command,
        Command::Serve(_) | Command::Bench(_) | Command::Approvals(_) | Command::Reviews(_)
    ) {
        // Printing commands end quietly when their reader goes away (`mistguard check | head`)
        // instead of panicking on a broken pipe. The daemon keeps Rust's ignored SIGPIPE.
        // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Check {
            dir,
            rulesets,
            models,
            config,
            json,
            policies,
        } => {
            // The same resolution as `serve` (flag, environment, config file, default).
            let mut flags = std::collections::HashMap::new();
            let given = [
                (
                    "rulesets",
                    dir.map(|d| d.display().to_string()).or(rulesets),
                ),
                ("models", models),
                ("policies", policies.map(|p| p.display().to_string())),
            ];
            for (k, v) in given {
                if let Some(v) = v {
                    flags.insert(k.to_string(), v);
                }
            }
            let args = mistguard::daemon::ServeArgs {
                config,
                flags,
                ..Default::default()
            };
            match args.load() {
                Ok(c) => {
                    if let Some(dir) = &c.tools.policies {
                        match mistguard::load::policy_dir(dir) {
                            Ok(p) => eprintln!(
                                "policies: {} ({} rules, version {})",
                                dir.display(),
                                p.rules(),
                                p.version()
                            ),
                            Err(e) => {
                                eprintln!("error: {e}");
                                return ExitCode::from(1);
                            }
                        }
                    }
                    check(c.rulesets, &c.models, json)
                }
                Err(e) => {
                    mistguard::daemon::say(&format!("mistguard: configuration: {e}"));
                    ExitCode::from(mistguard::daemon::EXIT_CONFIG)
                }
            }
        }
        Command::Classify {
            text,
            lang,
            rulesets,
            models,
            chunk,
            direction,
        } => classify(text, lang, rulesets, models, chunk, &direction),
        Command::Eval {
            corpus,
            rulesets,
            models,
            json,
            rule,
            show_fp,
            show_fn,
            lang_hint,
        } => eval(
            corpus, rulesets, models, json, rule, show_fp, show_fn, lang_hint,
        ),
        Command::Normalize => normalize_lines(),
        Command::Authorize {
            policies,
            tool,
            args,
            context,
            default_decision,
            rulesets,
            models,
        } => authorize(
            policies.as_deref(),
            &tool,
            (&args, &context),
            &default_decision,
            (rulesets.as_ref(), models.as_deref()),
        ),
        Command::Approvals(a) => mistguard::daemon::admin_cli::main(a),
        Command::Reviews(a) => mistguard::daemon::admin_cli::reviews_main(a),
        Command::Records(a) => mistguard::io::records::cli::main(a),
        Command::Serve(args) => mistguard::daemon::serve_main(*args),
        Command::Moderate(args) => mistguard::daemon::moderate_cli::moderate_main(*args),
        Command::Bench(args) => mistguard::daemon::bench_main(args),
    }
}

fn check(dir: Option<PathBuf>, models: &mistguard::load::Models, json: bool) -> ExitCode {
    let started = std::time::Instant::now();
    let dir = dir.filter(|d| d.as_os_str() != "bundled");
    let engine = match mistguard::load::engine(dir.as_deref(), models) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let learned = engine.learned().map(|l| {
        let m = &l.model;
        let heads: Vec<serde_json::Value> = l
            .heads
            .iter()
            .map(|h| {
                let label = mistguard::learned::LABELS[h.label];
                serde_json::json!({"label": label, "alone": h.alone, "flag": h.flag})
            })
            .collect();
        serde_json::json!({
            "source": m.source,
            "version": m.version,
            "file_bytes": m.file_bytes,
            "memory_bytes": m.memory_bytes(),
            "labels": mistguard::learned::LABELS,
            "heads": heads,
            "mode": format!("{:?}", l.mode).to_lowercase(),
            "flag_hits": l.flag_hits,
        })
    });
    let rs = engine.ruleset();
    let stats = engine.scanner().stats();
    let counts = mistguard::rules::pattern_counts(rs);
    let langs = mistguard::rules::languages(rs);
    if json {
        let v = serde_json::json!({
            "source": rs.source,
            "version": rs.version,
            "rules": rs.rules.iter().map(|r| serde_json::json!({"id": &*r.id, "name": r.name, "action": r.action, "threshold": r.threshold})).collect::<Vec<_>>(),
            "triggers": rs.triggers.len(),
            "languages": langs,
            "patterns": counts,
            "automata": stats,
            "model": learned,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return ExitCode::SUCCESS;
    }
    println!("rulesets: {} (version {})", rs.source, rs.version);
    println!(
        "rules: {}   triggers: {}   languages: {} ({})",
        rs.rules.len(),
        rs.triggers.len(),
        langs.len(),
        langs.join(" ")
    );
    println!(
        "word view: {} phrases (and {} spawn literals) in an {} of {} KiB, {} regexes in {} anchored DFAs ({} spawned by literals) of {} KiB and {} unanchored DFAs of {} KiB; a stream keeps up to {} bytes back",
        stats.word_phrases,
        stats.spawn_literals,
        stats.word_ac_kind,
        stats.word_ac_bytes / 1024,
        stats.word_regexes,
        stats.word_anchored_groups,
        stats.prefixed_groups,
        stats.word_anchored_bytes / 1024,
        stats.word_dfa_groups,
        stats.word_dfa_bytes / 1024,
        stats.word_window
    );
    println!(
        "raw view:  {} phrases, {} regexes, {} anchors in {} dense DFAs of {} KiB; a stream keeps up to {} bytes back ({} always, for look-behind)",
        stats.raw_phrases,
        stats.raw_regexes,
        stats.anchors,
        stats.raw_dfa_groups,
        stats.raw_dfa_bytes / 1024,
        stats.raw_window,
        stats.raw_look_behind
    );
    match engine.learned() {
        Some(l) => {
            let m = &l.model;
            let heads: Vec<String> = l
                .heads
                .iter()
                .map(|h| {
                    format!(
                        "{} (flag {:.4}, act {:.4})",
                        mistguard::learned::LABELS[h.label],
                        h.flag,
                        h.alone
                    )
                })
                .collect();
            println!(
                "model: {} (version {}, {} KiB, 2^{} buckets), mode {:?}, heads: {}",
                m.source,
                m.version,
                m.file_bytes / 1024,
                m.kbits,
                l.mode,
                heads.join(", ")
            );
        }
        None => println!("model: off (the rules alone)"),
    }
    println!("compiled in {} ms\n", started.elapsed().as_millis());
    println!("{}", pattern_table(&counts));
    ExitCode::SUCCESS
}

/// Rules as rows, languages as columns.
fn pattern_table(
    counts: &std::collections::BTreeMap<String, std::collections::BTreeMap<&'static str, usize>>,
) -> String {
    let mut cols: Vec<&str> = mistguard::lang::LANGS.iter().map(|l| l.code).collect();
    cols.push("neutral");
    let cols: Vec<&str> = cols
        .into_iter()
        .filter(|c| counts.values().any(|m| m.contains_key(c)))
        .collect();
    // Each column as wide as its heading (at least four digits) plus two spaces.
    let width = |c: &str| c.len().max(4) + 2;
    let mut s = format!("{:<14}", "patterns");
    for c in &cols {
        s.push_str(&format!("{c:>w$}", w = width(c)));
    }
    s.push_str("  total\n");
    for (rule, m) in counts {
        s.push_str(&format!("{rule:<14}"));
        for c in &cols {
            let cell = m.get(c).map_or_else(|| ".".to_string(), |n| n.to_string());
            s.push_str(&format!("{cell:>w$}", w = width(c)));
        }
        s.push_str(&format!("  {:>5}\n", m.values().sum::<usize>()));
    }
    s
}

fn classify(
    text: Option<String>,
    lang: Option<String>,
    rulesets: Option<PathBuf>,
    models: Option<String>,
    chunk: Option<usize>,
    direction: &str,
) -> ExitCode {
    let engine = match load(rulesets.as_ref(), models.as_deref()) {
        Ok(e) => e,
        Err(code) => return code,
    };
    if let Some(l) = &lang {
        if mistguard::lang::lang_id(l).is_none() {
            eprintln!(
                "error: unknown language `{l}` (supported: {})",
                mistguard::lang::supported_codes()
            );
            return ExitCode::from(2);
        }
    }
    let text = match text {
        Some(t) => t,
        None => {
            let mut buf = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut buf) {
                eprintln!("error: reading standard input: {e}");
                return ExitCode::from(1);
            }
            buf
        }
    };
    let direction = match direction {
        "input" => mistguard::Direction::Input,
        "output" => mistguard::Direction::Output,
        _ => mistguard::Direction::Unspecified,
    };
    let opts = ClassifyOptions {
        lang_hint: lang,
        direction,
        ..Default::default()
    };
    if let Some(n) = chunk {
        let n = n.max(1);
        let mut session = engine.session(&opts);
        session.compose_released_text();
        let mut at = 0;
        while at < text.len() {
            let mut end = (at + n).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            let step = session.feed(&text[at..end]);
            println!("{}", serde_json::to_string(&step).unwrap());
            at = end;
        }
        let step = session.finish();
        println!("{}", serde_json::to_string(&step).unwrap());
        let v = session.verdict(Some(&text));
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return ExitCode::SUCCESS;
    }
    let v = engine.classify(&text, &opts);
    println!("{}", serde_json::to_string_pretty(&v).unwrap());
    ExitCode::SUCCESS
}

/// `mistguard authorize`: see [`Command::Authorize`].
fn authorize(
    policies: Option<&std::path::Path>,
    tool: &str,
    (args, context): (&str, &str),
    default_decision: &str,
    (rulesets, models): (Option<&PathBuf>, Option<&str>),
) -> ExitCode {
    let parse = |text: &str, what: &str| match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err(format!("--{what} is not a JSON object")),
        Err(e) => Err(format!("--{what} is not valid JSON: {e}")),
    };
    let (args, context) = match (parse(args, "args"), parse(context, "context")) {
        (Ok(a), Ok(c)) => (a, c),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let set = match policies {
        None => mistguard::policy::PolicySet::empty(),
        Some(dir) => match mistguard::load::policy_dir(dir) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        },
    };
    let engine = match load(rulesets, models) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let scan = engine.scan_arguments(
        &args,
        &ClassifyOptions {
            direction: mistguard::Direction::ToolArguments,
            ..Default::default()
        },
    );
    let scan_rules: Vec<String> = scan.rules.iter().map(|r| r.to_string()).collect();
    let verdict = set.decide(
        &mistguard::policy::ToolCall {
            tool,
            args: &args,
            context: &context,
            scan_rules: &scan_rules,
            scan_action: scan.action,
        },
        &mistguard::policy::DecideOptions {
            default_decision: if default_decision == "deny" {
                mistguard::policy::ToolAction::Deny
            } else {
                mistguard::policy::ToolAction::Allow
            },
            ..Default::default()
        },
    );
    let out = serde_json::json!({
        "decision": verdict.decision,
        "policy": verdict.policy,
        "reason": verdict.reason,
        "approvers": verdict.approvers,
        "matched": verdict.matched,
        "eval_errors": verdict.eval_errors,
        "policy_version": set.version(),
        "scan": scan,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    match verdict.decision {
        mistguard::policy::ToolAction::Allow => ExitCode::SUCCESS,
        mistguard::policy::ToolAction::Deny => ExitCode::from(3),
        mistguard::policy::ToolAction::RequireApproval => ExitCode::from(4),
    }
}

#[allow(clippy::too_many_arguments)]
fn eval(
    corpus: PathBuf,
    rulesets: Option<PathBuf>,
    models: Option<String>,
    json: bool,
    rule: Option<String>,
    show_fp: Option<String>,
    show_fn: Option<String>,
    lang_hint: bool,
) -> ExitCode {
    let engine = match load(rulesets.as_ref(), models.as_deref()) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let items = match mistguard::eval::read_corpus(&corpus) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let started = std::time::Instant::now();
    eprintln!(
        "evaluating {} items from {} ...",
        items.len(),
        corpus.display()
    );
    let outcomes = mistguard::eval::run(&engine, &items, lang_hint);
    eprintln!("done in {:.2} s", started.elapsed().as_secs_f64());
    if let Some(r) = &show_fp {
        print!("{}", mistguard::eval::list(&items, &outcomes, r, true));
        return ExitCode::SUCCESS;
    }
    if let Some(r) = &show_fn {
        print!("{}", mistguard::eval::list(&items, &outcomes, r, false));
        return ExitCode::SUCCESS;
    }
    let report = mistguard::eval::score(&items, &outcomes);
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print!("{}", mistguard::eval::render(&report, rule.as_deref()));
    }
    ExitCode::SUCCESS
}

fn normalize_lines() -> ExitCode {
    use std::io::{BufRead, Write};
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: reading standard input: {e}");
                return ExitCode::from(1);
            }
        };
        let text = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(serde_json::Value::Object(o)) => match o.get("text") {
                Some(serde_json::Value::String(t)) => t.clone(),
                _ => {
                    eprintln!("error: line {}: no string `text`", n + 1);
                    return ExitCode::from(1);
                }
            },
            _ => {
                eprintln!("error: line {}: not a JSON object", n + 1);
                return ExitCode::from(1);
            }
        };
        let norm = mistguard::normalize::normalize(&text);
        if writeln!(out, "{}", serde_json::Value::String(norm)).is_err() {
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
