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
//! over its bytes (only the lead bytes of what cleaning touches are decoded); text with them is
//! copied in stretches between them.
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
    /// The last byte of the previous chunk was ASCII (a combining mark after it is dropped).
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
        let prev_ascii = self.prev_ascii;
        if let Some(&b) = bytes.last() {
            // A combining mark is dropped after an ASCII byte, whichever chunk it was in.
            self.prev_ascii = b < 0x80;
        }
        // One pass over the bytes: only the lead bytes of what cleaning touches are decoded, and
        // the unchanged stretches between them are copied in bulk once a first change is found.
        let mut copied = 0;
        let mut changed = false;
        let mut i = 0;
        while i < bytes.len() {
            let x = bytes[i];
            if !is_candidate_lead(x) {
                i += 1;
                continue;
            }
            let c = chunk[i..].chars().next().expect("char boundary");
            let len = c.len_utf8();
            let after_ascii = if i == 0 {
                prev_ascii
            } else {
                bytes[i - 1] < 0x80
            };
            let dropped =
                crate::normalize::is_ignorable(c) || (after_ascii && is_combining_mark(c));
            let folded = if dropped { None } else { fold(c) };
            if !dropped && folded.is_none() {
                i += len;
                continue;
            }
            if !changed {
                changed = true;
                buf.reserve(bytes.len());
            }
            buf.extend_from_slice(&bytes[copied..i]);
            self.clean_pos += (i - copied) as u64;
            let at = self.orig_pos + i as u64;
            if let Some(a) = folded {
                self.mark(at, len as u8);
                buf.push(a);
                self.clean_pos += 1;
            }
            // The next byte's original offset jumps past the character.
            self.mark(at + len as u64, 0);
            i += len;
            copied = i;
        }
        if changed {
            buf.extend_from_slice(&bytes[copied..]);
        }
        self.clean_pos += (bytes.len() - copied) as u64;
        self.orig_pos += bytes.len() as u64;
        changed
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
            return self.orig_pos;
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

/// The lead bytes of the characters cleaning may remove or fold: U+00AD, combining marks
/// U+0300-U+036F, the Arabic format characters, the U+0800-U+FFFF ranges in E0-E3 and EF, and
/// the planes starting F0 and F3. Everything else (ASCII, continuation bytes, Cyrillic, Chinese)
/// passes without being decoded.
#[inline]
fn is_candidate_lead(x: u8) -> bool {
    matches!(
        x,
        0xC2 | 0xCC | 0xCD | 0xD8 | 0xDB | 0xDC | 0xE0..=0xE3 | 0xEF | 0xF0 | 0xF3
    )
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
