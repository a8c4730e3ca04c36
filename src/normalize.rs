//! Normalization of text before matching, incremental, with offsets back to the original bytes.
//!
//! Triggers (at compile time) and texts (at scan time) go through the same function, so an
//! attacker's `ｉｇｎｏｒｅ`, `i​g​n​o​r​e`, `іgnore` (Cyrillic і), `1gn0re` or `IGNORE` all become
//! `ignore`. Steps, per character:
//!
//! 1. default-ignorable and format characters (zero-width spaces and joiners, bidi controls,
//!    Unicode tags, soft hyphen, variation selectors) are dropped;
//! 2. compatibility decomposition (the K of NFKC: fullwidth forms, ligatures, superscripts);
//!    combining marks are dropped after Latin, Greek, Cyrillic, Arabic and Hebrew letters (where
//!    they are accents or optional vowel points) and kept for scripts that need them; Hangul
//!    syllables stay composed. Both sides are folded alike, so recomposition is not needed;
//! 3. lower case, plus `ß`→`ss` and final sigma;
//! 4. a Cyrillic or Greek look-alike, or a leetspeak character, that stands next to a Latin letter
//!    becomes that letter (this needs one character of look-ahead, which the normalizer holds);
//! 5. every run of characters that are not letters, digits or marks becomes one space.
//!
//! The output is framed by a space at the start ([`Normalizer::new`]) and at the end
//! ([`Normalizer::finish`]) so that word boundaries are plain spaces in patterns.
//!
//! Every output byte carries the original span (start, length) of the character it came from, so
//! a match in the normalized text maps back to the caller's bytes.

use unicode_normalization::char::{decompose_compatible, is_combining_mark};

/// Receives normalized bytes, each with the original byte span of its source character.
pub trait NormSink {
    fn push(&mut self, byte: u8, orig_start: u64, orig_len: u8);

    /// Pushes a run of plain ASCII letters and digits, lowercased, one byte each, the first at
    /// original offset `orig_start`. A sink may do it in bulk.
    fn push_ascii_run(&mut self, run: &[u8], orig_start: u64) {
        for (k, &b) in run.iter().enumerate() {
            self.push(b.to_ascii_lowercase(), orig_start + k as u64, 1);
        }
    }
}

impl NormSink for Vec<u8> {
    fn push(&mut self, byte: u8, _orig_start: u64, _orig_len: u8) {
        Vec::push(self, byte);
    }
}

/// Incremental normalizer. Feed it `&str` chunks; the result is the same however the text is cut.
#[derive(Clone, Debug)]
pub struct Normalizer {
    /// Original offset of the next input byte.
    pos: u64,
    /// Look-alike or leetspeak characters in a row, waiting for the character after them.
    run: LookRun,
    /// A separator run, not yet emitted as its space: it may fold away inside a word
    /// (`ig.nore`, `**ig**nore`).
    sep: Option<Sep>,
    /// The last emitted character was a letter (of any script).
    prev_alpha: bool,
    /// Spaced single letters (`i g n o r e`) waiting to be joined.
    spaced: Spaced,
    /// The last letter emitted was Latin (words of look-alikes among Latin words fold).
    latin_context: bool,
    /// A leetspeak character was folded into a letter in the current word, in the last word.
    leet_word: bool,
    leet_context: bool,
    /// Original offset where the current line starts (after the last `\n`).
    line_start: u64,
    /// The last emitted character was a Latin letter.
    prev_latin: bool,
    /// The last emitted byte was a space (separators collapse).
    last_space: bool,
    /// Combining marks after the last base character are dropped.
    strip_marks: bool,
    started: bool,
}

impl Default for Normalizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Normalizer {
    pub fn new() -> Normalizer {
        Normalizer {
            pos: 0,
            run: LookRun::default(),
            sep: None,
            prev_alpha: false,
            spaced: Spaced::default(),
            latin_context: false,
            leet_word: false,
            leet_context: false,
            line_start: 0,
            prev_latin: false,
            last_space: false,
            strip_marks: false,
            started: false,
        }
    }

    /// Original bytes consumed so far, less those held back as look-ahead: every output for input
    /// before this offset has been emitted.
    pub fn settled_offset(&self) -> u64 {
        let mut at = self.pos;
        if self.run.len > 0 {
            at = at.min(self.run.start);
        }
        if let Some(sep) = &self.sep {
            at = at.min(sep.at);
        }
        if self.spaced.n > 0 {
            at = at.min(u64::from(self.spaced.pend[0].1));
        }
        at
    }

    /// Original bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.pos
    }

    fn start<S: NormSink>(&mut self, sink: &mut S) {
        if !self.started {
            self.started = true;
            sink.push(b' ', 0, 0);
            self.last_space = true;
        }
    }

    /// Normalizes one chunk.
    pub fn feed<S: NormSink>(&mut self, chunk: &str, sink: &mut S) {
        let mut spaced = std::mem::take(&mut self.spaced);
        self.feed_folded(
            chunk,
            &mut SpacedSink {
                inner: sink,
                st: &mut spaced,
            },
        );
        self.spaced = spaced;
    }

    /// [`feed`](Self::feed) before spaced letters are joined.
    fn feed_folded<S: NormSink>(&mut self, chunk: &str, sink: &mut S) {
        self.start(sink);
        let bytes = chunk.as_bytes();
        let base = self.pos;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if self.run.len > 0 {
                // Look-alikes wait for the character after them: this one. An ignorable one is
                // transparent, another look-alike joins the run; any other resolves the run and
                // is then handled below as usual.
                let c = chunk[i..].chars().next().expect("char boundary");
                let e = fast_entry(c);
                if e & IGNORABLE != 0 || (e & KIND_MASK == SLOW && is_ignorable(c)) {
                    i += c.len_utf8();
                    continue;
                }
                let at = base + i as u64;
                if e & KIND_MASK == LOOK || (e & KIND_MASK == SLOW && lookalike(c).is_some()) {
                    self.push_look(c, at, sink);
                    i += c.len_utf8();
                    continue;
                }
                let next_latin = if e & KIND_MASK == SLOW && c as u32 >= TABLE_END {
                    is_latin_letter(c)
                } else {
                    e & LATIN_LETTER != 0
                };
                self.resolve_run(Next::of(next_latin, c), sink);
                continue;
            }
            if b < 0x80 && !is_leet(b) {
                // ASCII fast path.
                let at = base + i as u64;
                if b.is_ascii_alphanumeric() {
                    // A run of letters and digits that are not leetspeak: lowercased in bulk.
                    let mut j = i + 1;
                    while j < bytes.len() && PLAIN_ALNUM[bytes[j] as usize] {
                        j += 1;
                    }
                    self.before_emit(b.is_ascii_alphabetic(), b.is_ascii_uppercase(), sink);
                    sink.push_ascii_run(&bytes[i..j], at);
                    self.last_space = false;
                    self.prev_latin = bytes[j - 1].is_ascii_alphabetic();
                    self.prev_alpha = self.prev_latin;
                    self.latin_context |= b.is_ascii_alphabetic() || self.prev_latin;
                    self.strip_marks = true;
                    i = j;
                    continue;
                } else {
                    self.separator(SepKind::of(b), at, 1);
                }
                i += 1;
                continue;
            }
            let c = chunk[i..].chars().next().expect("char boundary");
            let len = c.len_utf8();
            let at = base + i as u64;
            i += len;
            // Table fast path: the precomputed result of `char` for common characters.
            let e = fast_entry(c);
            match e & KIND_MASK {
                EMIT => {
                    self.emit_entry(e, at, len as u8, sink);
                    continue;
                }
                MARK => {
                    if !self.strip_marks {
                        self.emit_mark(c, at, len as u8, sink);
                    }
                    continue;
                }
                SEP => {
                    self.separator(SepKind::Hard, at, len as u8);
                    continue;
                }
                SKIP => continue,
                LOOK => {
                    self.push_look(c, at, sink);
                    continue;
                }
                _ => {}
            }
            self.char(c, at, len as u8, sink);
        }
        self.pos = base + bytes.len() as u64;
    }

    /// Applies the end of input: resolves the held character and emits the closing space.
    pub fn finish<S: NormSink>(&mut self, sink: &mut S) {
        let mut spaced = std::mem::take(&mut self.spaced);
        let mut out = SpacedSink {
            inner: sink,
            st: &mut spaced,
        };
        self.finish_folded(&mut out);
        out.flush();
    }

    fn finish_folded<S: NormSink>(&mut self, sink: &mut S) {
        self.start(sink);
        if self.run.len > 0 {
            self.resolve_run(Next::Nothing, sink);
        }
        if let Some(sep) = self.sep.take() {
            sink.push(b' ', sep.at, sep.len);
        } else if !self.last_space {
            sink.push(b' ', self.pos, 0);
            self.last_space = true;
        }
    }

    /// A separator character: starts (or extends) the pending separator run, which becomes one
    /// space when the next character is emitted, or nothing when it folds away inside a word.
    fn separator(&mut self, mut kind: SepKind, at: u64, len: u8) {
        if !self.last_space {
            // A word ends.
            self.leet_context = self.leet_word;
            self.leet_word = false;
        }
        if kind == SepKind::Newline {
            // A line break folds away inside a word of a short line only: hard-wrapped prose
            // (long lines) breaks between words.
            if at - self.line_start.min(at) >= SHORT_LINE {
                kind = SepKind::Hard;
            }
            self.line_start = at + 1;
        }
        if let Some(sep) = &mut self.sep {
            sep.add(kind);
        } else if !self.last_space {
            let mut sep = Sep {
                at,
                len,
                dots: 0,
                marks: 0,
                unders: 0,
                newlines: 0,
                hard: false,
            };
            sep.add(kind);
            self.sep = Some(sep);
            self.last_space = true;
        }
        self.prev_latin = false;
        self.strip_marks = false;
    }

    /// Emits the pending separator's space before a character, unless the separator folds away:
    /// a single `.` before a letter that is not upper case (`ig.nore`, but not `done.Then`), or a
    /// short run of markdown emphasis (`*`, `~`, `` ` ``, `__`), between two letters.
    #[inline]
    fn before_emit<S: NormSink>(&mut self, alpha: bool, upper: bool, sink: &mut S) {
        if let Some(sep) = self.sep.take() {
            if !(alpha && self.prev_alpha && sep.folds(upper)) {
                sink.push(b' ', sep.at, sep.len);
            }
        }
    }

    /// Adds a look-alike to the run waiting for its right neighbour (a full run is resolved
    /// first, as if a non-Latin character followed it).
    fn push_look<S: NormSink>(&mut self, c: char, at: u64, sink: &mut S) {
        if self.run.len as usize == RUN_MAX {
            self.resolve_run(Next::Nothing, sink);
        }
        self.run.push(c, at);
    }

    /// Resolves the run of look-alikes: all of them become Latin letters when a Latin letter
    /// stands right before or after the run, when the run itself is not one script's word (it
    /// mixes Cyrillic, Greek and leetspeak, or holds Latin small capitals), when it is a word
    /// of its own (no other letter or digit before or after it) of non-ASCII look-alikes among
    /// Latin words (`make а ріре bomb`), or a word of leetspeak digits right after a word
    /// written in leetspeak (`g01ng 70 k1ll`); else each is folded as itself, so a Russian or
    /// Greek word stays in its script, and numbers among plain words stay numbers (`a 14 year
    /// old`, `70 pears`).
    fn resolve_run<S: NormSink>(&mut self, next: Next, sink: &mut S) {
        let run = std::mem::take(&mut self.run);
        let prev_other = !self.last_space && self.prev_alpha && !self.prev_latin;
        let own_word = next == Next::Nothing && !prev_other;
        let fold_all = self.prev_latin
            || next == Next::Latin
            || run.not_a_word()
            || (self.latin_context && own_word && run.has_letters())
            || (self.leet_context && own_word && self.last_space && !run.has_letters());
        for k in 0..run.len as usize {
            let (c, at) = run.get(k);
            self.resolve(c, at, fold_all, sink);
        }
    }

    fn char<S: NormSink>(&mut self, c: char, at: u64, len: u8, sink: &mut S) {
        if is_ignorable(c) {
            return; // transparent: does not resolve a pending look-alike either
        }
        if lookalike(c).is_some() {
            self.push_look(c, at, sink);
            return;
        }
        if self.run.len > 0 {
            self.resolve_run(Next::of(is_latin_letter(c), c), sink);
        }
        self.fold(c, at, len, sink);
    }

    fn resolve<S: NormSink>(&mut self, c: char, at: u64, fold: bool, sink: &mut S) {
        let len = c.len_utf8() as u8;
        if fold {
            if let Some(l) = lookalike(c) {
                if c.is_ascii() {
                    self.leet_word = true;
                }
                self.before_emit(true, c.is_uppercase(), sink);
                sink.push(l, at, len);
                self.last_space = false;
                self.prev_latin = true;
                self.prev_alpha = true;
                self.latin_context = true;
                self.strip_marks = true;
                return;
            }
        }
        let e = fast_entry(c);
        if e & KIND_MASK == LOOK {
            if e & FOLD_SEP != 0 {
                self.separator(SepKind::Hard, at, len);
                return;
            }
            if e & FOLD_SLOW == 0 {
                self.emit_entry(e, at, len, sink);
                return;
            }
        }
        self.fold(c, at, len, sink);
    }

    /// Folds a character that is not held as a look-alike.
    fn fold<S: NormSink>(&mut self, c: char, at: u64, len: u8, sink: &mut S) {
        if c.is_ascii() {
            let b = c as u8;
            if b.is_ascii_alphanumeric() {
                self.before_emit(b.is_ascii_alphabetic(), b.is_ascii_uppercase(), sink);
                sink.push(b.to_ascii_lowercase(), at, len);
                self.last_space = false;
                self.prev_latin = b.is_ascii_alphabetic();
                self.prev_alpha = self.prev_latin;
                self.latin_context |= self.prev_latin;
                self.strip_marks = true;
            } else {
                self.separator(SepKind::of(b), at, len);
            }
            return;
        }
        if is_combining_mark(c) {
            if !self.strip_marks {
                self.emit_mark(c, at, len, sink);
            }
            return;
        }
        if is_hangul_syllable(c) {
            self.emit_char(c, at, len, sink);
            self.prev_latin = false;
            self.strip_marks = false;
            return;
        }
        let mut parts = [' '; 18];
        let mut n = 0;
        decompose_compatible(c, |d| {
            if n < parts.len() {
                parts[n] = d;
                n += 1;
            }
        });
        for &d in &parts[..n] {
            if is_combining_mark(d) {
                if !self.strip_marks {
                    self.emit_mark(d, at, len, sink);
                }
                continue;
            }
            if is_ignorable(d) {
                continue;
            }
            if is_plain_letter(d) {
                // Caseless or already lower-case letters of common scripts: no table lookups.
                self.emit_char(d, at, len, sink);
                self.prev_latin = false;
                self.strip_marks = strips_marks(d);
                continue;
            }
            let strip = strips_marks(d);
            // `d` is fully decomposed: a Latin letter is ASCII or one without a decomposition.
            let latin = d.is_ascii_alphabetic()
                || (matches!(d as u32, 0xC0..=0x24F | 0x1E00..=0x1EFF) && d != '×' && d != '÷');
            let mut any = false;
            for l in lower(d) {
                if l.is_alphanumeric() {
                    self.emit_char(l, at, len, sink);
                    any = true;
                } else {
                    self.separator(SepKind::Hard, at, len);
                }
            }
            if any {
                self.prev_latin = latin;
                self.strip_marks = strip;
            }
        }
    }

    /// Emits the character of a table entry and takes its flags.
    fn emit_entry<S: NormSink>(&mut self, e: u32, at: u64, len: u8, sink: &mut S) {
        let ch = char::from_u32(e & CHAR_MASK).expect("table holds chars");
        self.emit_char(ch, at, len, sink);
        self.prev_latin = e & PREV_LATIN != 0;
        self.strip_marks = e & STRIP != 0;
    }

    /// Emits a letter or digit (a non-ASCII one counts as a letter: a digit of another script
    /// between two separators changes nothing that matters).
    fn emit_char<S: NormSink>(&mut self, c: char, at: u64, len: u8, sink: &mut S) {
        // (`c` is already lower-cased: a `.` before a non-ASCII capital folds away.)
        let alpha = !c.is_ascii_digit();
        self.before_emit(alpha, false, sink);
        self.prev_alpha = alpha;
        if alpha {
            // Latin letters outside ASCII are below the table's end (U+3400).
            self.latin_context = (c as u32) < TABLE_END && is_latin_letter(c);
        }
        self.push_char(c, at, len, sink);
    }

    /// Emits a combining mark (kept after the letters of scripts that need them).
    fn emit_mark<S: NormSink>(&mut self, c: char, at: u64, len: u8, sink: &mut S) {
        self.before_emit(false, false, sink);
        self.push_char(c, at, len, sink);
    }

    fn push_char<S: NormSink>(&mut self, c: char, at: u64, len: u8, sink: &mut S) {
        let mut buf = [0u8; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            sink.push(b, at, len);
        }
        self.last_space = false;
    }
}

/// Lower case, with the few case foldings that lower-casing misses.
fn lower(c: char) -> impl Iterator<Item = char> {
    let special: Option<&'static [char]> = match c {
        'ß' | 'ẞ' => Some(&['s', 's']),
        'ς' => Some(&['σ']),
        _ => None,
    };
    let (a, b) = match special {
        Some(s) => (None, Some(s.iter().copied())),
        None => (Some(c.to_lowercase()), None),
    };
    a.into_iter().flatten().chain(b.into_iter().flatten())
}

const fn is_leet(b: u8) -> bool {
    matches!(b, b'0' | b'1' | b'3' | b'4' | b'5' | b'7' | b'@' | b'$')
}

/// ASCII letters and digits that are not leetspeak: they normalize to themselves, lowercased.
static PLAIN_ALNUM: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 128 {
        t[b] = (b as u8).is_ascii_alphanumeric() && !is_leet(b as u8);
        b += 1;
    }
    t
};

/// The Latin letter a look-alike or leetspeak character stands for: leetspeak digits and
/// symbols, and the letters of other scripts that UTS #39 (`confusables.txt`, through the
/// `unicode-security` crate) lists as confusable with one Latin letter ([`confusables`]).
fn lookalike(c: char) -> Option<u8> {
    match c {
        '0' => Some(b'o'),
        '1' => Some(b'i'),
        '3' => Some(b'e'),
        '4' => Some(b'a'),
        '5' => Some(b's'),
        '7' => Some(b't'),
        '@' => Some(b'a'),
        '$' => Some(b's'),
        _ if c.is_ascii() => None,
        _ => confusables().get(&c).copied(),
    }
}

/// Blocks whose letters may stand in for Latin letters: Cyrillic, Greek, Armenian, Cherokee, and
/// the Latin-script small capitals and phonetic letters that compatibility decomposition leaves
/// alone (`ᴏ`, `ꜱ`, `ɑ`).
const CONFUSABLE_BLOCKS: [std::ops::RangeInclusive<u32>; 9] = [
    0x0250..=0x02AF, // IPA extensions
    0x0370..=0x03FF, // Greek
    0x0400..=0x052F, // Cyrillic and its supplement
    0x0530..=0x058F, // Armenian
    0x13A0..=0x13FF, // Cherokee
    0x1D00..=0x1DBF, // phonetic extensions (small capitals)
    0x1F00..=0x1FFF, // Greek extended
    0xA720..=0xA7FF, // Latin extended-D (small capitals)
    0xAB30..=0xAB6F, // Latin extended-E
];

/// Letters of [`CONFUSABLE_BLOCKS`] whose UTS #39 skeleton is one Latin letter (accents
/// dropped: `ё` is `e`), lower-cased. Built once from the crate's copy of `confusables.txt`.
fn confusables() -> &'static std::collections::HashMap<char, u8> {
    static MAP: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
        std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let mut map = std::collections::HashMap::new();
        let mut buf = [0u8; 4];
        for c in CONFUSABLE_BLOCKS
            .iter()
            .flat_map(|r| r.clone())
            .filter_map(char::from_u32)
            .filter(|c| c.is_alphabetic() && !latin_letter_slow(*c))
        {
            let mut letters = unicode_security::skeleton(c.encode_utf8(&mut buf))
                .filter(|d| !is_combining_mark(*d));
            if let (Some(l), None) = (letters.next(), letters.next()) {
                if l.is_ascii_alphabetic() {
                    map.insert(c, l.to_ascii_lowercase() as u8);
                }
            }
        }
        map
    })
}

/// What follows a run of look-alikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// A Latin letter.
    Latin,
    /// A letter of another script, or a digit.
    Other,
    /// No letter (a separator, a digit, the end).
    Nothing,
}

impl Next {
    fn of(latin: bool, c: char) -> Next {
        if latin {
            Next::Latin
        } else if c.is_alphanumeric() {
            Next::Other
        } else {
            Next::Nothing
        }
    }
}

/// Most look-alikes in a row that wait for their right neighbour (a longer run is resolved in
/// pieces).
const RUN_MAX: usize = 8;

/// Look-alike characters in a row, with their original offsets (from `start`).
#[derive(Clone, Debug, Default)]
struct LookRun {
    start: u64,
    chars: [char; RUN_MAX],
    delta: [u32; RUN_MAX],
    len: u8,
}

impl LookRun {
    fn push(&mut self, c: char, at: u64) {
        if self.len == 0 {
            self.start = at;
        }
        let k = self.len as usize;
        self.chars[k] = c;
        // Streams are capped below 4 GiB (see `StreamSession::feed`).
        self.delta[k] = (at - self.start) as u32;
        self.len += 1;
    }

    fn get(&self, k: usize) -> (char, u64) {
        (self.chars[k], self.start + self.delta[k] as u64)
    }

    /// The run holds a look-alike letter (not only leetspeak digits and symbols).
    fn has_letters(&self) -> bool {
        self.chars[..self.len as usize]
            .iter()
            .any(|c| !c.is_ascii())
    }

    /// The run cannot be a word of one script: it mixes scripts (Cyrillic, Greek, leetspeak,
    /// others), or holds a Latin small capital or phonetic letter.
    fn not_a_word(&self) -> bool {
        let mut seen = 0u8;
        for &c in &self.chars[..self.len as usize] {
            seen |= match c as u32 {
                0..=0x7F => 1,
                0x0370..=0x03FF | 0x1F00..=0x1FFF => 2,
                0x0400..=0x052F => 4,
                0x0250..=0x02AF | 0x1D00..=0x1DBF | 0xA720..=0xA7FF | 0xAB30..=0xAB6F => {
                    return true
                }
                _ => 8,
            };
        }
        seen.count_ones() > 1
    }
}

/// Spaced single letters (`i g n o r e`): the normalized bytes of a run of single-letter words
/// held back until it is known whether the run reaches [`SPACED_MIN`] letters, when the spaces
/// between them fold away. Shorter runs (`I a m`) pass unchanged.
#[derive(Clone, Copy, Debug, Default)]
struct Spaced {
    /// Held bytes with their original spans: a space, then single letters each followed by a
    /// space, possibly ending with a letter whose word may go on.
    pend: [(u8, u32, u8); 2 * SPACED_MIN + 1],
    n: u8,
    /// A run reached [`SPACED_MIN`] letters: single letters go on joining it.
    joining: bool,
    /// Original end offset of the last letter joined: letters one character apart (a single
    /// space) make a word; a wider gap (`k i l l   y o u`) keeps its space.
    last_end: u64,
}

/// Single-letter words in a row that are joined into one word.
const SPACED_MIN: usize = 4;

/// The sink the folding steps write to: joins spaced single letters on the way to `inner`.
struct SpacedSink<'a, S: NormSink> {
    inner: &'a mut S,
    st: &'a mut Spaced,
}

impl<S: NormSink> SpacedSink<'_, S> {
    fn hold(&mut self, b: u8, at: u64, len: u8) {
        // Streams are capped below 4 GiB (see `StreamSession::feed`).
        self.st.pend[self.st.n as usize] = (b, at as u32, len);
        self.st.n += 1;
    }

    /// Passes every held byte on unchanged.
    fn flush(&mut self) {
        for &(b, at, len) in &self.st.pend[..self.st.n as usize] {
            self.inner.push(b, u64::from(at), len);
        }
        self.st.n = 0;
        self.st.joining = false;
    }

    fn last(&self) -> Option<u8> {
        self.st.n.checked_sub(1).map(|k| self.st.pend[k as usize].0)
    }
}

impl<S: NormSink> NormSink for SpacedSink<'_, S> {
    fn push(&mut self, b: u8, at: u64, len: u8) {
        let letter = b.is_ascii_lowercase();
        if self.st.n == 0 && !letter && b != b' ' {
            // Nothing held, and not a letter or a space: passes straight on.
            self.inner.push(b, at, len);
            return;
        }
        match (b, self.last()) {
            (b' ', Some(l)) if l != b' ' => {
                // The held letter was a word of its own.
                if self.st.joining {
                    // pend: [space, letter]: the letter joins the run (after a space when the
                    // gap before it is wider than one character: a word boundary).
                    let pend = self.st.pend;
                    if u64::from(pend[1].1) > self.st.last_end + 1 {
                        self.inner.push(pend[0].0, u64::from(pend[0].1), pend[0].2);
                    }
                    self.inner.push(pend[1].0, u64::from(pend[1].1), pend[1].2);
                    self.st.last_end = u64::from(pend[1].1) + pend[1].2 as u64;
                    self.st.n = 0;
                    self.hold(b, at, len);
                    return;
                }
                self.hold(b, at, len);
                if self.st.n as usize == 2 * SPACED_MIN + 1 {
                    // space, then SPACED_MIN letters each followed by a space: join them,
                    // keeping the spaces of wider gaps (`y o u   a r e`: two words).
                    let pend = self.st.pend;
                    self.inner.push(pend[0].0, u64::from(pend[0].1), pend[0].2);
                    self.inner.push(pend[1].0, u64::from(pend[1].1), pend[1].2);
                    for k in (3..2 * SPACED_MIN).step_by(2) {
                        let prev_end = u64::from(pend[k - 2].1) + pend[k - 2].2 as u64;
                        if u64::from(pend[k].1) > prev_end + 1 {
                            self.inner
                                .push(pend[k - 1].0, u64::from(pend[k - 1].1), pend[k - 1].2);
                        }
                        self.inner.push(pend[k].0, u64::from(pend[k].1), pend[k].2);
                    }
                    let last = pend[2 * SPACED_MIN - 1];
                    self.st.last_end = u64::from(last.1) + last.2 as u64;
                    self.st.n = 0;
                    self.hold(b, at, len);
                    self.st.joining = true;
                }
            }
            (b' ', _) => {
                self.flush();
                self.hold(b, at, len);
            }
            (_, Some(b' ')) if letter => self.hold(b, at, len),
            _ => {
                // A word of two letters or more, or not a letter: whatever was held passes.
                self.flush();
                self.inner.push(b, at, len);
            }
        }
    }

    fn push_ascii_run(&mut self, run: &[u8], orig_start: u64) {
        // A run of two letters or digits or more is a word of its own (or the rest of one):
        // whatever was held passes, then the run in bulk. One byte may be a word of one letter.
        match run {
            [b] => self.push(b.to_ascii_lowercase(), orig_start, 1),
            _ => {
                self.flush();
                self.inner.push_ascii_run(run, orig_start);
            }
        }
    }
}

/// Lines shorter than this (in bytes) may have a line break inside a word (`ig\nnore`).
const SHORT_LINE: u64 = 40;

/// What a separator character is, for folding separators inside words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SepKind {
    Dot,
    /// Markdown emphasis: `*`, `~`, `` ` ``.
    Mark,
    Under,
    Newline,
    Hard,
}

impl SepKind {
    fn of(b: u8) -> SepKind {
        match b {
            b'.' => SepKind::Dot,
            b'*' | b'~' | b'`' => SepKind::Mark,
            b'_' => SepKind::Under,
            b'\n' => SepKind::Newline,
            _ => SepKind::Hard,
        }
    }
}

/// A run of separator characters not yet emitted as its space.
#[derive(Clone, Copy, Debug)]
struct Sep {
    /// The first separator character's original span (the space's span).
    at: u64,
    len: u8,
    dots: u8,
    marks: u8,
    unders: u8,
    newlines: u8,
    hard: bool,
}

impl Sep {
    fn add(&mut self, kind: SepKind) {
        let n = match kind {
            SepKind::Dot => &mut self.dots,
            SepKind::Mark => &mut self.marks,
            SepKind::Under => &mut self.unders,
            SepKind::Newline => &mut self.newlines,
            SepKind::Hard => {
                self.hard = true;
                return;
            }
        };
        *n = n.saturating_add(1);
    }

    /// Between two letters this run folds away: one `.` or one line break (in a line shorter
    /// than [`SHORT_LINE`]) before a letter that is not a capital (`ig.nore`, `ig\nnore`;
    /// `instructions.Tell` is two sentences), or markdown emphasis of up
    /// to four characters (`ig**nore`, `ig__nore`; a single `_` stays a separator: snake_case
    /// names are words).
    fn folds(&self, upper: bool) -> bool {
        if self.hard {
            return false;
        }
        let md = self.marks + self.unders;
        let lone = |n: u8| n == 1 && self.dots + md + self.newlines == 1;
        ((lone(self.dots) || lone(self.newlines)) && !upper)
            || (self.dots + self.newlines == 0 && (1..=4).contains(&md) && self.unders != 1)
    }
}

// The fast-path table: for each character below `TABLE_END` (and the CJK and Hangul blocks
// checked at build time), what `Normalizer::char` does with it when no look-alike is pending.
// An entry is a character in the low 21 bits, a kind and two flags.
const CHAR_MASK: u32 = 0x1F_FFFF;
const KIND_MASK: u32 = 0x7 << 21;
const SLOW: u32 = 0;
/// Emit the entry's character; then `prev_latin` and `strip_marks` take the flags.
const EMIT: u32 = 1 << 21;
/// A combining mark: emitted unless marks are being stripped.
const MARK: u32 = 2 << 21;
/// A separator.
const SEP: u32 = 3 << 21;
/// Dropped without a trace.
const SKIP: u32 = 4 << 21;
const PREV_LATIN: u32 = 1 << 24;
const STRIP: u32 = 1 << 25;
/// `is_latin_letter` of the character itself (for resolving a pending look-alike).
const LATIN_LETTER: u32 = 1 << 26;
/// A look-alike or leetspeak character: held for its right neighbour. The entry's character and
/// flags are what folding it gives (when it does not become a Latin letter), unless one of:
const LOOK: u32 = 5 << 21;
/// ... folding it gives a separator;
const FOLD_SEP: u32 = 1 << 27;
/// ... folding it takes the general path.
const FOLD_SLOW: u32 = 1 << 28;
/// `is_ignorable` of the character (transparent to a pending look-alike).
const IGNORABLE: u32 = 1 << 29;
const TABLE_END: u32 = 0x3400;

struct FastTable {
    low: Box<[u32]>,
    /// Every CJK unified ideograph (U+3400–U+9FFF) and Hangul syllable is emitted as itself.
    cjk_plain: bool,
    hangul_plain: bool,
}

static TABLE: std::sync::OnceLock<FastTable> = std::sync::OnceLock::new();

fn table() -> &'static FastTable {
    TABLE.get_or_init(|| {
        let low = (0..TABLE_END)
            .map(|u| char::from_u32(u).map_or(SLOW, classify))
            .collect();
        let plain = |r: std::ops::RangeInclusive<u32>| {
            r.filter_map(char::from_u32)
                .all(|c| classify(c) == EMIT | c as u32)
        };
        FastTable {
            low,
            cjk_plain: plain(0x3400..=0x9FFF),
            hangul_plain: plain(0xAC00..=0xD7A3),
        }
    })
}

#[inline]
fn fast_entry(c: char) -> u32 {
    let u = c as u32;
    let t = table();
    if u < TABLE_END {
        t.low[u as usize]
    } else if (t.cjk_plain && (0x3400..=0x9FFF).contains(&u))
        || (t.hangul_plain && (0xAC00..=0xD7A3).contains(&u))
    {
        EMIT | u
    } else {
        SLOW
    }
}

/// Records what the normalizer emits, for building the table.
#[derive(Default, PartialEq, Eq)]
struct Record(Vec<u8>);

impl NormSink for Record {
    fn push(&mut self, byte: u8, _orig_start: u64, _orig_len: u8) {
        self.0.push(byte);
    }
}

/// The table entry of a character: runs the general path from every starting state and keeps the
/// character only where the result is one of the simple kinds.
fn classify(c: char) -> u32 {
    let latin_bit = if latin_letter_slow(c) {
        LATIN_LETTER
    } else {
        0
    };
    if lookalike(c).is_some() {
        let folded = classify_fold(c);
        return LOOK
            | latin_bit
            | match folded & KIND_MASK {
                EMIT => folded & !KIND_MASK,
                SEP => FOLD_SEP,
                _ => FOLD_SLOW,
            };
    }
    if c.is_ascii() {
        return SLOW | latin_bit;
    }
    if is_ignorable(c) {
        return SKIP | latin_bit | IGNORABLE;
    }
    if is_combining_mark(c) {
        return MARK | latin_bit;
    }
    classify_fold(c) | latin_bit
}

/// What `Normalizer::fold` does with `c`: EMIT, SEP or SKIP when that is the same from every
/// state, else SLOW.
fn classify_fold(c: char) -> u32 {
    let mut kinds = Vec::new();
    for (strip, last_space, prev_latin) in [
        (false, false, false),
        (true, true, true),
        (false, true, false),
        (true, false, true),
    ] {
        let mut n = Normalizer {
            prev_latin,
            last_space,
            strip_marks: strip,
            started: true,
            ..Normalizer::new()
        };
        let mut out = Record::default();
        n.fold(c, 0, c.len_utf8() as u8, &mut out);
        if let Some(sep) = n.sep.take() {
            out.push(b' ', sep.at, sep.len);
        }
        let text = String::from_utf8(out.0).expect("normalizer emits UTF-8");
        let after = (n.prev_latin, n.last_space, n.strip_marks);
        let mut chars = text.chars();
        let kind = match (chars.next(), chars.next()) {
            (Some(ch), None) if ch != ' ' && !n.last_space => {
                let mut e = EMIT | ch as u32;
                if n.prev_latin {
                    e |= PREV_LATIN;
                }
                if n.strip_marks {
                    e |= STRIP;
                }
                e
            }
            _ if text == if last_space { "" } else { " " } && after == (false, true, false) => SEP,
            (None, _) if after == (prev_latin, last_space, strip) => SKIP,
            _ => SLOW,
        };
        kinds.push(kind);
    }
    if kinds.iter().all(|&k| k == kinds[0]) {
        kinds[0]
    } else {
        SLOW
    }
}

/// Whether `c` is a Latin letter (its compatibility decomposition starts with an ASCII letter).
fn is_latin_letter(c: char) -> bool {
    if (c as u32) < TABLE_END && !c.is_ascii() {
        if let Some(t) = TABLE.get() {
            return t.low[c as usize] & LATIN_LETTER != 0;
        }
    }
    latin_letter_slow(c)
}

fn latin_letter_slow(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    if !c.is_alphabetic() {
        return false;
    }
    let mut first = None;
    decompose_compatible(c, |d| {
        if first.is_none() {
            first = Some(d);
        }
    });
    first.is_some_and(|d| d.is_ascii_alphabetic())
        || matches!(c as u32, 0x00C0..=0x024F | 0x1E00..=0x1EFF)
}

/// Scripts whose combining marks are accents or optional vowel points, dropped when folding.
fn strips_marks(c: char) -> bool {
    matches!(c as u32,
        0x0041..=0x024F      // Latin
        | 0x1E00..=0x1EFF    // Latin extended additional (Vietnamese)
        | 0x0370..=0x03FF    // Greek
        | 0x1F00..=0x1FFF    // Greek extended
        | 0x0400..=0x052F    // Cyrillic
        | 0x0590..=0x05FF    // Hebrew
        | 0x0600..=0x06FF    // Arabic
        | 0x0750..=0x077F
        | 0xFB1D..=0xFDFF
        | 0xFE70..=0xFEFF
        | 0xFF21..=0xFF5A)
}

/// Letters that are their own lower case, in blocks where every code point in the range is a
/// letter: the normalizer's fast path (same result as the general path, without Unicode tables).
fn is_plain_letter(c: char) -> bool {
    matches!(c as u32,
        0x0430..=0x045F      // Cyrillic lower case
        | 0x05D0..=0x05EA    // Hebrew letters
        | 0x0621..=0x063A | 0x0641..=0x064A // Arabic letters
        | 0x0905..=0x0939    // Devanagari letters
        | 0x0E01..=0x0E30    // Thai letters
        | 0x3041..=0x3096    // Hiragana
        | 0x30A1..=0x30FA    // Katakana
        | 0x4E00..=0x9FFF) // CJK unified ideographs
}

fn is_hangul_syllable(c: char) -> bool {
    matches!(c as u32, 0xAC00..=0xD7A3)
}

/// Default-ignorable code points and format characters (general category Cf).
pub fn is_ignorable(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F | 0x1160 | 0x17B4 | 0x17B5
        | 0x180B..=0x180F
        | 0x200B..=0x200F
        | 0x202A..=0x202E
        | 0x2060..=0x206F
        | 0x3164
        | 0xFE00..=0xFE0F
        | 0xFEFF
        | 0xFFA0
        | 0xFFF0..=0xFFFB
        | 0x110BD | 0x110CD
        | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3
        | 0x1D173..=0x1D17A
        | 0xE0000..=0xE0FFF
        | 0x0600..=0x0605 | 0x06DD | 0x070F | 0x08E2)
}

/// Normalizes a whole string (phrases at compile time, tests). The output is framed by spaces.
pub fn normalize(text: &str) -> String {
    let mut n = Normalizer::new();
    let mut out = Vec::with_capacity(text.len() + 2);
    n.feed(text, &mut out);
    n.finish(&mut out);
    String::from_utf8(out).expect("normalizer emits UTF-8")
}

/// Normalizes a phrase without the framing spaces (what a pattern is compiled from).
pub fn normalize_phrase(text: &str) -> String {
    normalize(text).trim_matches(' ').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_the_usual_tricks() {
        for t in [
            "ignore",
            "IGNORE",
            "ｉｇｎｏｒｅ",
            "i\u{200b}g\u{200b}n\u{200b}o\u{200b}r\u{200b}e",
            "\u{456}gnore",
            "1gn0re",
            "i\u{308}g\u{301}nore",
            "\u{202e}ignore\u{202c}",
            "ig\u{e0041}nore",
        ] {
            assert_eq!(normalize_phrase(t), "ignore", "{t:?}");
        }
    }

    #[test]
    fn keeps_numbers_and_collapses_separators() {
        assert_eq!(normalize("10,000 -- prompts!"), " 10 000 prompts ");
        assert_eq!(normalize("Straße"), " strasse ");
        assert_eq!(normalize("  "), " ");
    }

    #[test]
    fn keeps_non_latin_scripts() {
        assert_eq!(normalize_phrase("Убить"), "убить");
        assert_eq!(normalize_phrase("मार डालो"), "मार डालो");
        assert_eq!(normalize_phrase("殺す"), "殺す");
        assert_eq!(normalize_phrase("죽여"), "죽여");
    }

    #[test]
    fn the_fast_path_agrees_with_the_general_one() {
        for c in (0x0400u32..0x0600)
            .chain(0x0600..0x0700)
            .chain(0x0900..0x0980)
            .chain(0x0E00..0x0E80)
            .chain(0x3040..0x3100)
            .chain(0x4E00..0x4F00)
            .filter_map(char::from_u32)
        {
            if is_plain_letter(c) {
                assert!(c.is_alphanumeric(), "{c:?}");
                assert_eq!(c.to_lowercase().collect::<String>(), c.to_string(), "{c:?}");
                assert!(!is_latin_letter(c), "{c:?}");
            }
        }
    }

    /// The general path alone: every non-ASCII character through `char`, no table.
    fn normalize_general(text: &str) -> Vec<u8> {
        let mut n = Normalizer::new();
        let mut out = Vec::new();
        let mut spaced = Spaced::default();
        let mut sink = SpacedSink {
            inner: &mut out,
            st: &mut spaced,
        };
        n.start(&mut sink);
        for (i, c) in text.char_indices() {
            n.char(c, i as u64, c.len_utf8() as u8, &mut sink);
        }
        n.pos = text.len() as u64;
        n.finish_folded(&mut sink);
        sink.flush();
        out
    }

    #[test]
    fn the_table_agrees_with_the_general_path() {
        // Every table character and a sample of the blocks checked in bulk, each between
        // neighbours that exercise the state it depends on: a Latin letter, a mark, a space, a
        // look-alike, a digit.
        let neighbours = [
            "a", "\u{301}", " ", "\u{430}", "1", "\u{4e00}", "\u{5d0}", "\u{200b}", "@", "\u{3b1}",
        ];
        let sample = (0x20u32..TABLE_END)
            .chain((0x3400..=0x9FFF).step_by(97))
            .chain((0xAC00..=0xD7A3).step_by(89))
            .chain(0xFF00..0xFFF0)
            .filter_map(char::from_u32);
        for c in sample {
            for l in neighbours {
                for r in neighbours {
                    let text = format!("{l}{c}{r}{c}\u{301}{c}");
                    assert_eq!(
                        normalize(&text).into_bytes(),
                        normalize_general(&text),
                        "U+{:04X} in {text:?}",
                        c as u32
                    );
                }
            }
        }
    }

    #[test]
    fn chunking_does_not_change_output() {
        let text = "Ｉｇｎоre   prev1ous\u{200b} instructions, é\u{301}te 10 ans";
        let whole = normalize(text);
        for cut in text.char_indices().map(|(i, _)| i) {
            let mut n = Normalizer::new();
            let mut out = Vec::new();
            n.feed(&text[..cut], &mut out);
            n.feed(&text[cut..], &mut out);
            n.finish(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), whole, "cut at {cut}");
        }
    }
}
