//! `mistguard records`: verify a stream's hash chain, query its records.

use super::{time, Filter, Format};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit status for a bad directory or bad arguments.
const EXIT_USAGE: u8 = 64;

#[derive(clap::Args, Debug)]
pub struct RecordsArgs {
    #[command(subcommand)]
    pub command: RecordsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum RecordsCommand {
    /// Check the hash chain of a stream's segments (exit 0 intact, 1 broken, 64 bad directory).
    ///
    /// Checks every line's hash, and that each `prev` is the hash of the record before it,
    /// across segments; the oldest remaining segment is the anchor (retention deletes whole
    /// oldest segments), a missing segment in between is broken. Prints one line. Exit 0 when intact (a
    /// torn last line, left by a crash, is noted: the daemon cuts it off when it starts), 1 when
    /// broken (naming the first broken record), 64 for a bad directory.
    Verify {
        /// The records directory (the daemon's records_dir).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The stream: decisions, reports or samples.
        #[arg(long, default_value = "decisions")]
        stream: String,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the decision records that match the filters, as JSON lines or CSV.
    ///
    /// A record is printed when it matches every given filter (a repeated flag: any of its
    /// values), oldest first. JSON lines are the records without the chain fields (hash, prev);
    /// CSV has a header line and times in RFC 3339 (UTC). The chain is not checked here (use
    /// `records verify`). Exit 0, or 64 for a bad directory or bad arguments.
    Query {
        /// The records directory (the daemon's records_dir).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The stream: decisions or reports.
        #[arg(long, default_value = "decisions")]
        stream: String,
        /// Records at or after TIME: RFC 3339 (2026-12-06T10:00:00Z) or a duration ago (15m,
        /// 2h, 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Records before TIME (same forms as --since).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Records with a hit of this rule (e.g. RULE-MIST-003); repeatable.
        #[arg(long = "rule", value_name = "RULE")]
        rules: Vec<String>,
        /// Records with this action (e.g. block); repeatable.
        #[arg(long = "action", value_name = "ACTION")]
        actions: Vec<String>,
        /// Records at exactly this escalation level.
        #[arg(long, value_name = "N")]
        level: Option<u32>,
        /// Records of this RPC: classify, classify_stream or authorize_tool_call; repeatable.
        #[arg(long = "rpc", value_name = "RPC")]
        rpcs: Vec<String>,
        /// Records of this subject, given in clear: it is hashed with the key of
        /// --subject-key-file, as the daemon hashed it; the subject itself is not printed.
        #[arg(long, value_name = "SUBJECT")]
        subject: Option<String>,
        /// The daemon's subject key: its subject_key_file, or the key file in its data_dir
        /// (at least 32 bytes; surrounding whitespace ignored).
        #[arg(long, value_name = "FILE")]
        subject_key_file: Option<PathBuf>,
        /// Output format.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
        format: String,
    },
}

fn check_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{}: not a directory", dir.display())),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

/// Runs `mistguard records ...`.
pub fn main(args: RecordsArgs) -> ExitCode {
    match args.command {
        RecordsCommand::Verify { dir, stream, json } => verify(&dir, &stream, json),
        RecordsCommand::Query {
            dir,
            stream,
            since,
            until,
            rules,
            actions,
            level,
            rpcs,
            subject,
            subject_key_file,
            format,
        } => {
            let now = time::now_ms();
            let parse = |flag: &str, v: Option<String>| -> Result<Option<u64>, String> {
                v.map(|s| time::parse_time_arg(&s, now).map_err(|e| format!("--{flag} {e}")))
                    .transpose()
            };
            let filter = (|| -> Result<Filter, String> {
                let subject_hash = match (subject, subject_key_file) {
                    (None, _) => None,
                    (Some(_), None) => {
                        return Err(
                            "--subject needs --subject-key-file (the daemon's subject key)".into(),
                        )
                    }
                    (Some(s), Some(f)) => Some(subject_hash(&s, &f)?),
                };
                Ok(Filter {
                    since_ms: parse("since", since)?,
                    until_ms: parse("until", until)?,
                    rules,
                    actions,
                    level,
                    rpcs,
                    subject_hash,
                })
            })();
            let filter = match filter.and_then(|f| check_dir(&dir).map(|()| f)) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let format = if format == "csv" {
                Format::Csv
            } else {
                Format::Jsonl
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            match super::query(&dir, &stream, &filter, format, &mut out) {
                Ok(n) => {
                    drop(out);
                    eprintln!("{n} records");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let _ = out.flush();
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// The 32-hex hash of `subject` under the key in `key_file`, as the daemon stores it.
fn subject_hash(subject: &str, key_file: &Path) -> Result<String, String> {
    let secret = std::fs::read(key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let hasher =
        crate::daemon::ids::SubjectHasher::from_secret(secret.trim_ascii()).ok_or_else(|| {
            format!(
                "{}: the subject key must be at least 32 bytes",
                key_file.display()
            )
        })?;
    Ok(hasher.hash(subject).hex())
}

fn verify(dir: &Path, stream: &str, json: bool) -> ExitCode {
    if let Err(e) = check_dir(dir) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let report = match super::verify(dir, stream) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if report.segments == 0 {
        eprintln!(
            "error: {}: no {stream}-*.jsonl segments (is --stream right?)",
            dir.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else if let Some(b) = &report.first_broken {
        let id =
            b.id.as_ref()
                .map(|i| format!(" (id {i})"))
                .unwrap_or_default();
        println!("broken: {} line {}{id}: {}", b.file, b.line, b.why);
    } else {
        let torn = if report.torn_tail {
            "; the last line is torn (a write cut short), the daemon truncates it on start"
        } else {
            ""
        };
        println!(
            "ok: {} segments, {} records, chain intact{torn}",
            report.segments, report.records
        );
    }
    if report.first_broken.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
