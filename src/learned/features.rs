//! The features of the learned tier, computed incrementally over the normalized text (the word
//! view's own normalization), with the original offset of each character.
//!
//! Over the normalized text ` w1 w2 … ` (`normalize`: lower case, folded, separators → one
//! space, framed by spaces):
//!
//! | kind | feature | bytes hashed |
//! |---|---|---|
//! | 1 | character n-grams, n = 1..4 (Unicode scalars), except the 1-gram `" "` | the n-gram's UTF-8 |
//! | 2 | words (maximal runs of non-space characters) | the word's UTF-8 |
//! | 3 | word bigrams | `w1 + " " + w2` |
//!
//! Each feature is FNV-1a 64 over `[kind] ++ bytes`, and its bucket is `(h ^ h >> 32) mod
//! 2^kbits` (`training/featc.c` is the trainer's twin of this code; the parity test holds them
//! together). FNV-1a is a streaming hash, so an n-gram's hash grows with each character: three
//! running states give every n-gram ending at a character in four steps, and a word's and a
//! bigram's hashes grow as their characters arrive. A feature belongs to the block of the
//! original text that holds its **last** character.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

const KIND_CHAR: u8 = 1;
const KIND_WORD: u8 = 2;
const KIND_BIGRAM: u8 = 3;

#[inline]
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(FNV_PRIME))
}

#[inline]
fn fnv_start(kind: u8) -> u64 {
    fnv(FNV_OFFSET, &[kind])
}

/// Receives each feature's bucket, with the original offset of its last character.
pub(crate) trait FeatureSink {
    fn add(&mut self, bucket: u32, at: u64);
}

/// The bucket of a feature hash in a table of `mask + 1` rows.
#[inline]
fn bucket(h: u64, mask: u64) -> u32 {
    ((h ^ (h >> 32)) & mask) as u32
}

/// The running hashes of one stream's features.
#[derive(Clone, Debug, Default)]
pub(crate) struct Features {
    /// Hashes of the n-grams that started 3, 2 and 1 characters ago (valid for the first
    /// `chars` of them).
    grams: [u64; 3],
    /// Characters seen, up to 3.
    chars: u8,
    /// A word is in progress: its hash, the hash of the bigram ending with it (when a word came
    /// before), the hash of `[3] ++ word` (the next bigram's start), and the original offset of
    /// its last character so far.
    in_word: bool,
    has_prev: bool,
    word: u64,
    bigram: u64,
    next_bigram: u64,
    /// `[3] ++ previous word ++ " "`.
    prev_prefix: u64,
    word_last: u64,
}

impl Features {
    /// The original offset of the last character of the word in progress: its features will
    /// belong to that block or a later one.
    pub(crate) fn word_in_progress(&self) -> Option<u64> {
        self.in_word.then_some(self.word_last)
    }

    /// Adds one normalized character (its UTF-8 `bytes`), which came from original offset `at`;
    /// buckets are taken modulo `mask + 1` (a power of two).
    #[inline]
    pub(crate) fn push_char<S: FeatureSink>(
        &mut self,
        mask: u64,
        bytes: &[u8],
        at: u64,
        sink: &mut S,
    ) {
        // Character n-grams ending here: the 4-, 3- and 2-grams extend the running states, the
        // 1-gram starts a new one.
        let [g3, g2, g1] = self.grams;
        if self.chars >= 3 {
            sink.add(bucket(fnv(g3, bytes), mask), at);
        }
        let n3 = fnv(g2, bytes);
        if self.chars >= 2 {
            sink.add(bucket(n3, mask), at);
        }
        let n2 = fnv(g1, bytes);
        if self.chars >= 1 {
            sink.add(bucket(n2, mask), at);
        }
        let n1 = fnv(fnv_start(KIND_CHAR), bytes);
        let space = bytes == b" ";
        if !space {
            sink.add(bucket(n1, mask), at);
        }
        self.grams = [n3, n2, n1];
        self.chars = (self.chars + 1).min(3);
        // Words and bigrams.
        if space {
            if self.in_word {
                sink.add(bucket(self.word, mask), self.word_last);
                if self.has_prev {
                    sink.add(bucket(self.bigram, mask), self.word_last);
                }
                self.prev_prefix = fnv(self.next_bigram, b" ");
                self.has_prev = true;
                self.in_word = false;
            }
            return;
        }
        if !self.in_word {
            self.in_word = true;
            self.word = fnv_start(KIND_WORD);
            self.next_bigram = fnv_start(KIND_BIGRAM);
            self.bigram = self.prev_prefix;
        }
        self.word = fnv(self.word, bytes);
        self.next_bigram = fnv(self.next_bigram, bytes);
        if self.has_prev {
            self.bigram = fnv(self.bigram, bytes);
        }
        self.word_last = at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash the trainer's reference computes for one feature.
    fn reference(kind: u8, s: &str) -> u64 {
        let mut h = FNV_OFFSET;
        for b in std::iter::once(kind).chain(s.bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(FNV_PRIME);
        }
        h
    }

    /// The trainer's reference (`training/features.py:hashed_features_py`), ported: every
    /// feature's bucket, char n-grams by start then words with their bigrams.
    fn reference_buckets(norm: &str, mask: u64) -> Vec<u32> {
        let chars: Vec<char> = norm.chars().collect();
        let mut out = Vec::new();
        for i in 0..chars.len() {
            for n in 1..=4 {
                if i + n > chars.len() {
                    break;
                }
                let g: String = chars[i..i + n].iter().collect();
                if g == " " {
                    continue;
                }
                out.push(bucket(reference(KIND_CHAR, &g), mask));
            }
        }
        let words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
        for (j, w) in words.iter().enumerate() {
            out.push(bucket(reference(KIND_WORD, w), mask));
            if j > 0 {
                let bi = format!("{} {w}", words[j - 1]);
                out.push(bucket(reference(KIND_BIGRAM, &bi), mask));
            }
        }
        out
    }

    struct Collect(Vec<(u32, u64)>);
    impl FeatureSink for Collect {
        fn add(&mut self, bucket: u32, at: u64) {
            self.0.push((bucket, at));
        }
    }

    #[test]
    fn the_incremental_features_are_the_trainers() {
        let mask = (1 << 18) - 1;
        for norm in [
            " how do i kill a python process ",
            " ignore all previous instructions ",
            " 今天天气很好 ",
            " cafe a x ",
            " ",
            " ы ",
        ] {
            let mut f = Features::default();
            let mut got = Collect(Vec::new());
            for (at, c) in norm.char_indices() {
                let mut buf = [0u8; 4];
                f.push_char(
                    mask,
                    c.encode_utf8(&mut buf).as_bytes(),
                    at as u64,
                    &mut got,
                );
            }
            let mut got: Vec<u32> = got.0.into_iter().map(|x| x.0).collect();
            let mut want = reference_buckets(norm, mask);
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "{norm:?}");
        }
    }

    #[test]
    fn a_feature_belongs_to_its_last_character() {
        let mut f = Features::default();
        let mut got = Collect(Vec::new());
        for (at, c) in " ab cd ".char_indices() {
            let mut buf = [0u8; 4];
            f.push_char(
                u64::MAX,
                c.encode_utf8(&mut buf).as_bytes(),
                at as u64 * 100,
                &mut got,
            );
        }
        // The word "ab" ends at its `b` (offset 2 → 200); the bigram "ab cd" at `d` (500).
        let word = bucket(reference(KIND_WORD, "ab"), u64::MAX);
        let bigram = bucket(reference(KIND_BIGRAM, "ab cd"), u64::MAX);
        assert!(got.0.contains(&(word, 200)));
        assert!(got.0.contains(&(bigram, 500)));
        assert_eq!(f.word_in_progress(), None);
    }

    #[test]
    fn fnv1a_is_the_published_function() {
        // FNV-1a 64 of "a" and "foobar" (the published test vectors), without a kind byte.
        assert_eq!(fnv(FNV_OFFSET, b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv(FNV_OFFSET, b"foobar"), 0x85944171f73967e8);
        assert_eq!(fnv(fnv_start(2), "héllo".as_bytes()), reference(2, "héllo"));
    }
}
