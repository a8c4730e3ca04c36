//! The line format, segment names and the listing of a stream's segments.

use std::path::{Path, PathBuf};

/// `prev` of the very first record of a stream.
pub(crate) const ZERO_HASH: [u8; 32] = [0u8; 32];

/// `{"hash":"` — the start of every line.
const HEAD: &[u8] = b"{\"hash\":\"";
/// `"prev":"` — the start of R, the hashed part of a line.
const PREV: &[u8] = b"\"prev\":\"";

/// One segment of a stream: `<stream>-<seq:010>.jsonl` in the sink's directory.
#[derive(Clone, Debug)]
pub(crate) struct Segment {
    pub seq: u64,
    pub path: PathBuf,
}

pub(crate) fn segment_name(stream: &str, seq: u64) -> String {
    format!("{stream}-{seq:010}.jsonl")
}

/// The segments of `stream` in `dir`, in `seq` order.
pub(crate) fn list_segments(dir: &Path, stream: &str) -> Result<Vec<Segment>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = parse_segment_name(name, stream) {
            out.push(Segment {
                seq,
                path: entry.path(),
            });
        }
    }
    out.sort_by_key(|s| s.seq);
    Ok(out)
}

fn parse_segment_name(name: &str, stream: &str) -> Option<u64> {
    let rest = name.strip_prefix(stream)?.strip_prefix('-')?;
    let digits = rest.strip_suffix(".jsonl")?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn hex32(bytes: &[u8; 32]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
    out
}

fn unhex32(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (val(pair[0])? << 4) | val(pair[1])?;
    }
    Some(out)
}

/// Appends one line (with its `\n`) for the record body `body` (the serialized record without
/// its leading `{`) to `buf`, chained after `prev`; returns the line's hash.
pub(crate) fn append_line(buf: &mut Vec<u8>, prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    buf.extend_from_slice(HEAD);
    let hash_at = buf.len();
    buf.extend_from_slice(&[b'0'; 64]);
    buf.extend_from_slice(b"\",");
    let r_start = buf.len();
    buf.extend_from_slice(PREV);
    buf.extend_from_slice(&hex32(prev));
    buf.push(b'"');
    if body != b"}" {
        buf.push(b',');
    }
    buf.extend_from_slice(body);
    let hash: [u8; 32] = *blake3::hash(&buf[r_start..]).as_bytes();
    buf[hash_at..hash_at + 64].copy_from_slice(&hex32(&hash));
    buf.push(b'\n');
    hash
}

/// What one line (without its `\n`) says about the chain.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineCheck {
    /// The line is well formed and its hash verifies: (its hash, its prev).
    Good { hash: [u8; 32], prev: [u8; 32] },
    /// Not a chain line at all.
    Malformed,
    /// Well formed, but the hash does not match the bytes.
    HashMismatch,
}

/// Checks the format of one line (without its `\n`) and its own hash.
pub(crate) fn check_line(line: &[u8]) -> LineCheck {
    let Some(rest) = line.strip_prefix(HEAD) else {
        return LineCheck::Malformed;
    };
    if rest.len() < 66 || &rest[64..66] != b"\"," {
        return LineCheck::Malformed;
    }
    let Some(hash) = unhex32(&rest[..64]) else {
        return LineCheck::Malformed;
    };
    let r = &rest[66..];
    let Some(after_prev) = r.strip_prefix(PREV) else {
        return LineCheck::Malformed;
    };
    if after_prev.len() < 66 || after_prev[64] != b'"' || !r.ends_with(b"}") {
        return LineCheck::Malformed;
    }
    let Some(prev) = unhex32(&after_prev[..64]) else {
        return LineCheck::Malformed;
    };
    if blake3::hash(r).as_bytes() != &hash {
        return LineCheck::HashMismatch;
    }
    LineCheck::Good { hash, prev }
}

/// The result of looking at the end of a segment's bytes for the last good line.
pub(crate) struct Tail {
    /// The length of the good prefix (just after the last good line's `\n`).
    pub good_len: u64,
    /// The last good line's hash, if the good prefix holds any line.
    pub last_hash: Option<[u8; 32]>,
}

/// Walks back from the end of `data`: drops a final part without `\n`, then complete lines that
/// are malformed or whose hash does not verify, and stops at the first good line.
pub(crate) fn good_tail(data: &[u8]) -> Tail {
    let mut end = match data.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => 0,
    };
    while end > 0 {
        let line_end = end - 1; // the `\n`
        let start = data[..line_end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        if let LineCheck::Good { hash, .. } = check_line(&data[start..line_end]) {
            return Tail {
                good_len: end as u64,
                last_hash: Some(hash),
            };
        }
        end = start;
    }
    Tail {
        good_len: 0,
        last_hash: None,
    }
}
