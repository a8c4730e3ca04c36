//! The raw view's input: the caller's bytes with invisible characters removed and fullwidth and
//! mathematical letters and digits folded to ASCII, and the map from its offsets back to the
//! caller's.
//!
//! PII and SECRET triggers (and the other raw-view triggers: chat delimiters, code) match exact
//! bytes, so one zero-width space, a soft hyphen or fullwidth digits inside a card number or an
//! API key would hide it. The raw view therefore reads a cleaned copy of each chunk:
//! - characters that `normalize::is_ignorable` drops (zero-width spaces and joiners, bidi
//!   controls, soft hyphen, variation selectors, Unicode tags) are removed, and so are combining
//!   marks right after an ASCII character (`4\u{301}111`: no number or key carries accents);
//! - fullwidth ASCII (`４`, `ｓ`, U+FF01..=U+FF5E) and mathematical letters and digits
//!   (`𝟒`, `𝐬`, U+1D400..=U+1D7FF) become the ASCII character they stand for.
//!
//! Nothing else changes (no case folding, no look-alikes: a validator such as Luhn or IBAN reads
//! the folded digits). Text without such characters passes through untouched and costs one pass
//! over its bytes looking for a non-ASCII byte.
//!
//! [`CleanMap`] keeps the points where the cleaned offsets part from the original ones, from the
//! oldest offset the raw view can still report on; hits, partial-match floors and the release
//! offset are mapped back through it.

use unicode_normalization::char::{decompose_compatible, is_combining_mark};

/// Where cleaned offsets part from the caller's. Each point says: from cleaned offset `clean`
/// on, the original offset is `orig + (x - clean)`; a point with `folded > 0` covers one cleaned
/// byte that stands for an original character of `folded` bytes.
#[derive(Clone, Debug, Default)]
pub(crate) struct CleanMap {
    points: Vec<Point>,
    /// Original bytes fed so far.
    pub(crate) orig_pos: u64,
    /// Cleaned bytes produced so far.
    clean_pos: u64,
    /// The last character kept was ASCII (a combining mark after it is dropped).
    prev_ascii: bool,
}

#[derive(Clone, Copy, Debug)]
struct Point {
    clean: u64,
    orig: u64,
    folded: u8,
}

impl CleanMap {
    /// Cleans one chunk into `buf`; false when the chunk passes unchanged (then read the chunk
    /// itself, `buf` is left empty).
    pub(crate) fn clean(&mut self, chunk: &str, buf: &mut Vec<u8>) -> bool {
        buf.clear();
        let bytes = chunk.as_bytes();
        if bytes.is_ascii() || !needs_cleaning(chunk, self.prev_ascii) {
            self.orig_pos += bytes.len() as u64;
            self.clean_pos += bytes.len() as u64;
            if let Some(c) = chunk.chars().next_back() {
                self.prev_ascii = c.is_ascii();
            }
            return false;
        }
        buf.reserve(bytes.len());
        for (i, c) in chunk.char_indices() {
            let at = self.orig_pos + i as u64;
            let len = c.len_utf8();
            if crate::normalize::is_ignorable(c) || (self.prev_ascii && is_combining_mark(c)) {
                // Dropped: the next byte's original offset jumps past it.
                self.mark(at + len as u64, 0);
                continue;
            }
            if let Some(a) = fold(c) {
                self.mark(at, len as u8);
                buf.push(a);
                self.prev_ascii = true;
                self.clean_pos += 1;
                self.mark(at + len as u64, 0);
                continue;
            }
            let mut tmp = [0u8; 4];
            buf.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
            self.prev_ascii = c.is_ascii();
            self.clean_pos += len as u64;
        }
        self.orig_pos += bytes.len() as u64;
        true
    }

    /// Records that cleaned offset `clean_pos` is original offset `orig` from here on.
    fn mark(&mut self, orig: u64, folded: u8) {
        if let Some(last) = self.points.last_mut() {
            if last.clean == self.clean_pos {
                *last = Point {
                    clean: self.clean_pos,
                    orig,
                    folded,
                };
                return;
            }
        }
        if self.points.is_empty() && folded == 0 && orig == self.clean_pos {
            return;
        }
        self.points.push(Point {
            clean: self.clean_pos,
            orig,
            folded,
        });
    }

    /// The original offset of the character at cleaned offset `x` (or of the end of input).
    pub(crate) fn start(&self, x: u64) -> u64 {
        if x >= self.clean_pos {
            return self.orig_pos - (self.clean_pos - x.min(self.clean_pos));
        }
        match self.point(x) {
            Some(p) if p.folded > 0 => p.orig,
            Some(p) => p.orig + (x - p.clean),
            None => x,
        }
    }

    /// The original offset where a match ending at cleaned offset `x` ends.
    pub(crate) fn end(&self, x: u64) -> u64 {
        if x == 0 {
            return 0;
        }
        match self.point(x - 1) {
            Some(p) if p.folded > 0 => p.orig + p.folded as u64,
            _ => self.start(x - 1) + 1,
        }
    }

    fn point(&self, x: u64) -> Option<&Point> {
        let k = self.points.partition_point(|p| p.clean <= x);
        k.checked_sub(1).map(|k| &self.points[k])
    }

    /// Forgets the points before cleaned offset `x` (keeping the one that maps it): nothing
    /// older will be mapped again.
    pub(crate) fn forget_before(&mut self, x: u64) {
        let k = self.points.partition_point(|p| p.clean <= x);
        if k > 1 {
            self.points.drain(..k - 1);
        }
    }

    pub(crate) fn state_bytes(&self) -> usize {
        self.points.capacity() * std::mem::size_of::<Point>()
    }
}

/// Whether a chunk holds a character that cleaning removes or folds. A byte loop: only the lead
/// bytes of such characters (and of combining marks, after an ASCII byte) are decoded and
/// looked at, so Chinese or Russian text costs one pass over its bytes.
fn needs_cleaning(chunk: &str, prev_ascii: bool) -> bool {
    let bytes = chunk.as_bytes();
    for (i, &x) in bytes.iter().enumerate() {
        // ASCII and continuation bytes; the lead bytes of everything cleaning touches (U+00AD,
        // U+0300-U+036F, Arabic format characters, U+0800-U+FFFF ranges in E0-E3 and EF, and
        // the planes starting F0 and F3) are the others below.
        if x < 0xC2
            || !matches!(
                x,
                0xC2 | 0xCC | 0xCD | 0xD8 | 0xDB | 0xDC | 0xE0..=0xE3 | 0xEF | 0xF0 | 0xF3
            )
        {
            continue;
        }
        let c = chunk[i..].chars().next().expect("char boundary");
        let after_ascii = if i == 0 {
            prev_ascii
        } else {
            bytes[i - 1] < 0x80
        };
        if crate::normalize::is_ignorable(c)
            || fold(c).is_some()
            || (after_ascii && is_combining_mark(c))
        {
            return true;
        }
    }
    false
}

/// The ASCII character a fullwidth or mathematical letter or digit stands for.
fn fold(c: char) -> Option<u8> {
    let u = c as u32;
    match u {
        0xFF01..=0xFF5E => Some((u - 0xFEE0) as u8),
        0x1D400..=0x1D7FF => {
            let mut out = None;
            let mut n = 0;
            decompose_compatible(c, |d| {
                n += 1;
                if d.is_ascii_alphanumeric() {
                    out = Some(d as u8);
                }
            });
            if n == 1 {
                out
            } else {
                None
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cleaned(text: &str, cuts: &[usize]) -> (String, CleanMap) {
        let mut m = CleanMap::default();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut from = 0;
        for &c in cuts.iter().chain(std::iter::once(&text.len())) {
            if !m.clean(&text[from..c], &mut buf) {
                out.extend_from_slice(&text.as_bytes()[from..c]);
            } else {
                out.extend_from_slice(&buf);
            }
            from = c;
        }
        (String::from_utf8(out).unwrap(), m)
    }

    #[test]
    fn removes_invisibles_and_folds_fullwidth_with_offsets() {
        let text = "card 4111\u{200b}1111 ４１１１-𝟏111 ok é\u{301}";
        let (clean, m) = cleaned(text, &[]);
        assert_eq!(clean, "card 41111111 4111-1111 ok é\u{301}");
        for (needle, orig) in [
            ("41111111", "4111\u{200b}1111"),
            ("4111-1111", "４１１１-𝟏111"),
        ] {
            let s = clean.find(needle).unwrap() as u64;
            let e = s + needle.len() as u64;
            let (os, oe) = (m.start(s) as usize, m.end(e) as usize);
            assert_eq!(&text[os..oe], orig);
        }
        assert_eq!(m.start(clean.len() as u64), text.len() as u64);
    }

    #[test]
    fn chunking_changes_nothing() {
        let text = "a\u{ad}b ｘ\u{200d}y \u{e0041}z 4\u{301}1";
        let (whole, mw) = cleaned(text, &[]);
        let cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).skip(1).collect();
        let (parts, mp) = cleaned(text, &cuts);
        assert_eq!(whole, parts);
        for x in 0..=whole.len() as u64 {
            assert_eq!(mw.start(x), mp.start(x));
            if x > 0 {
                assert_eq!(mw.end(x), mp.end(x));
            }
        }
    }

    #[test]
    fn plain_text_passes_untouched() {
        let mut m = CleanMap::default();
        let mut buf = Vec::new();
        assert!(!m.clean("Ünïcode prose, no tricks: 日本語", &mut buf));
        assert_eq!(m.start(3), 3);
        assert_eq!(m.state_bytes(), 0);
    }
}
