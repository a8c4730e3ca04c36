//! Reading a stream back: verify its chain, query its records.

use super::chain::{self, LineCheck};
use super::DecisionRecord;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

/// The first place where a stream's chain does not hold.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Broken {
    /// The segment's file name.
    pub file: String,
    /// 1-based line number in that segment.
    pub line: u64,
    /// The record's id, when the line parses.
    pub id: Option<String>,
    /// What is wrong.
    pub why: String,
}

/// What [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub segments: usize,
    /// Records read (up to the first broken one, when there is one).
    pub records: u64,
    pub first_broken: Option<Broken>,
    /// The last segment ends in a line without `\n` (a write cut short by a crash): not counted
    /// as broken; the daemon truncates it when it opens the stream.
    pub torn_tail: bool,
}

fn line_id(line: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_slice::<Id>(line).ok().map(|i| i.id)
}

/// Walks every segment of `stream` in `dir` in `seq` order and checks each line's hash and that
/// each `prev` is the hash of the line before it (across segments). The oldest remaining
/// segment's first `prev` is the anchor (older ones may have been deleted by retention); a gap
/// in `seq` is broken.
///
/// # Errors
/// When the directory or a segment cannot be read (naming the path and the OS error).
pub fn verify(dir: &Path, stream: &str) -> Result<VerifyReport, String> {
    let segs = chain::list_segments(dir, stream)?;
    let mut report = VerifyReport {
        segments: segs.len(),
        ..VerifyReport::default()
    };
    let mut prev: Option<[u8; 32]> = None;
    let mut last_seq: Option<u64> = None;
    for (i, seg) in segs.iter().enumerate() {
        let file = seg
            .path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let broken = |line: u64, id: Option<String>, why: String| Broken {
            file: file.clone(),
            line,
            id,
            why,
        };
        if let Some(l) = last_seq {
            if seg.seq != l + 1 {
                report.first_broken = Some(broken(
                    1,
                    None,
                    format!(
                        "segment {} follows {}: segments in between are missing",
                        seg.seq, l
                    ),
                ));
                return Ok(report);
            }
        }
        last_seq = Some(seg.seq);
        let is_last = i + 1 == segs.len();
        let f =
            std::fs::File::open(&seg.path).map_err(|e| format!("{}: {e}", seg.path.display()))?;
        let mut reader = BufReader::with_capacity(1 << 20, f);
        let mut line = Vec::new();
        let mut n = 0u64;
        loop {
            line.clear();
            let got = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| format!("{}: {e}", seg.path.display()))?;
            if got == 0 {
                break;
            }
            n += 1;
            if line.last() != Some(&b'\n') {
                // Only the very end of the stream may be cut short.
                let mut more = [0u8; 1];
                let at_end = std::io::Read::read(&mut reader, &mut more).unwrap_or(0) == 0;
                if is_last && at_end {
                    report.torn_tail = true;
                    return Ok(report);
                }
                report.first_broken = Some(broken(
                    n,
                    line_id(&line),
                    "the line has no end (\\n)".into(),
                ));
                return Ok(report);
            }
            let body = &line[..line.len() - 1];
            match chain::check_line(body) {
                LineCheck::Malformed => {
                    report.first_broken =
                        Some(broken(n, line_id(body), "not a chained record line".into()));
                    return Ok(report);
                }
                LineCheck::HashMismatch => {
                    report.first_broken = Some(broken(
                        n,
                        line_id(body),
                        "hash does not match the line (the line was changed)".into(),
                    ));
                    return Ok(report);
                }
                LineCheck::Good { hash, prev: p } => {
                    if prev.is_some_and(|want| want != p) {
                        report.first_broken = Some(broken(
                            n,
                            line_id(body),
                            "prev does not match the hash of the record before (a record was removed, inserted or moved)".into(),
                        ));
                        return Ok(report);
                    }
                    prev = Some(hash);
                    report.records += 1;
                }
            }
        }
    }
    Ok(report)
}

/// Which records [`query`] prints; every set criterion must hold (a list: any of its values).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `time_unix_ms >= since_ms`.
    pub since_ms: Option<u64>,
    /// `time_unix_ms < until_ms`.
    pub until_ms: Option<u64>,
    /// Some hit's rule is one of these.
    pub rules: Vec<String>,
    pub actions: Vec<String>,
    /// Exactly this escalation level.
    pub level: Option<u32>,
    pub rpcs: Vec<String>,
    /// The 32-hex subject hash.
    pub subject_hash: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &DecisionRecord) -> bool {
        let any = |set: &[String], v: &str| set.is_empty() || set.iter().any(|s| s == v);
        self.since_ms.is_none_or(|s| r.time_unix_ms >= s)
            && self.until_ms.is_none_or(|u| r.time_unix_ms < u)
            && (self.rules.is_empty() || r.hits.iter().any(|h| any(&self.rules, &h.rule)))
            && any(&self.actions, &r.action)
            && self.level.is_none_or(|l| r.level == l)
            && any(&self.rpcs, &r.rpc)
            && self
                .subject_hash
                .as_ref()
                .is_none_or(|s| s.eq_ignore_ascii_case(&r.subject_hash))
    }
}

/// How [`query`] prints records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One record JSON object a line, without the chain fields (`hash`, `prev`).
    Jsonl,
    /// A header line, then one row a record (see [`CSV_HEADER`]).
    Csv,
}

/// The columns of [`Format::Csv`].
pub const CSV_HEADER: &str = "id,time,rpc,direction,subject_hash,request_id,language,rules,triggers,action,level,reason,ruleset_version,policy_version,text_bytes,text_hash,latency_us";

/// Quotes a CSV field when it holds a comma, a quote or a line break (RFC 4180).
pub fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

fn csv_row(r: &DecisionRecord) -> String {
    let rules: Vec<&str> = r.hits.iter().map(|h| h.rule.as_str()).collect();
    let triggers: Vec<&str> = r.hits.iter().map(|h| h.trigger.as_str()).collect();
    let cols: [std::borrow::Cow<'_, str>; 17] = [
        csv_field(&r.id),
        super::time::format_rfc3339_ms(r.time_unix_ms).into(),
        csv_field(&r.rpc),
        csv_field(&r.direction),
        csv_field(&r.subject_hash),
        csv_field(&r.request_id),
        csv_field(&r.language),
        csv_field(&rules.join(";")).into_owned().into(),
        csv_field(&triggers.join(";")).into_owned().into(),
        csv_field(&r.action),
        r.level.to_string().into(),
        csv_field(&r.reason),
        csv_field(&r.ruleset_version),
        csv_field(&r.policy_version),
        r.text_bytes.to_string().into(),
        csv_field(&r.text_hash),
        r.latency_us.to_string().into(),
    ];
    cols.join(",")
}

/// Prints the records of `stream` in `dir` that match `filter` to `out`, oldest first; returns
/// how many. Lines that are not decision records (or a torn last line) are skipped; `query`
/// does not check the chain (that is [`verify`]'s job).
///
/// # Errors
/// When a segment cannot be read or `out` cannot be written.
pub fn query(
    dir: &Path,
    stream: &str,
    filter: &Filter,
    format: Format,
    out: &mut dyn Write,
) -> Result<usize, String> {
    let segs = chain::list_segments(dir, stream)?;
    let werr = |e: std::io::Error| format!("output: {e}");
    if format == Format::Csv {
        writeln!(out, "{CSV_HEADER}").map_err(werr)?;
    }
    let mut count = 0;
    let mut line = Vec::new();
    for seg in &segs {
        let f =
            std::fs::File::open(&seg.path).map_err(|e| format!("{}: {e}", seg.path.display()))?;
        let mut reader = BufReader::with_capacity(1 << 20, f);
        loop {
            line.clear();
            let got = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| format!("{}: {e}", seg.path.display()))?;
            if got == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                continue;
            }
            let Ok(rec) = serde_json::from_slice::<DecisionRecord>(&line) else {
                continue;
            };
            if !filter.matches(&rec) {
                continue;
            }
            match format {
                Format::Jsonl => {
                    serde_json::to_writer(&mut *out, &rec).map_err(|e| format!("output: {e}"))?;
                    out.write_all(b"\n").map_err(werr)?;
                }
                Format::Csv => writeln!(out, "{}", csv_row(&rec)).map_err(werr)?,
            }
            count += 1;
        }
    }
    out.flush().map_err(werr)?;
    Ok(count)
}
