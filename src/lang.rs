//! Languages: the supported codes, their scripts, and which languages' triggers apply to a text.
//!
//! The choice is made once per text, from a caller's hint or from whatlang over the first
//! [`PROBE_BYTES`] bytes (so a stream and the whole text decide alike):
//! - a hint: the hint plus English;
//! - a reliable detection of a supported language in a single script: that language plus English;
//! - otherwise (short, mixed, unsupported): every supported language written in a script that
//!   occurs in the probe, plus English.
//!
//! English is always applied because injections and jailbreaks are overwhelmingly written in it,
//! whatever the language of the surrounding text. A trigger written in another script than every
//! chosen language also applies ([`LangSet::accepts`]): a Chinese phrase inside English text is
//! mixed text by itself.

use whatlang::Lang;

/// Bytes of text used to decide the language.
pub const PROBE_BYTES: usize = 128;

/// Coarse writing systems, as a bit in a `u16` set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Writing {
    Latin = 0,
    Cyrillic,
    Arabic,
    Hebrew,
    Devanagari,
    Bengali,
    Han,
    Kana,
    Hangul,
    Thai,
    Greek,
}

pub struct LangInfo {
    pub code: &'static str,
    pub name: &'static str,
    pub writing: Writing,
    /// Words are separated by spaces, so phrases match at word boundaries by default.
    pub spaced: bool,
    /// whatlang's code, when whatlang knows the language (it does not know Swahili).
    pub whatlang: Option<Lang>,
}

macro_rules! langs {
    ($( $code:literal $name:literal $w:ident $spaced:literal $wl:expr ;)*) => {
        pub static LANGS: &[LangInfo] = &[
            $( LangInfo { code: $code, name: $name, writing: Writing::$w, spaced: $spaced, whatlang: $wl }, )*
        ];
    };
}

langs! {
    "en" "English" Latin true Some(Lang::Eng);
    "fr" "French" Latin true Some(Lang::Fra);
    "de" "German" Latin true Some(Lang::Deu);
    "es" "Spanish" Latin true Some(Lang::Spa);
    "it" "Italian" Latin true Some(Lang::Ita);
    "pt" "Portuguese" Latin true Some(Lang::Por);
    "nl" "Dutch" Latin true Some(Lang::Nld);
    "pl" "Polish" Latin true Some(Lang::Pol);
    "ru" "Russian" Cyrillic true Some(Lang::Rus);
    "uk" "Ukrainian" Cyrillic true Some(Lang::Ukr);
    "cs" "Czech" Latin true Some(Lang::Ces);
    "sv" "Swedish" Latin true Some(Lang::Swe);
    "da" "Danish" Latin true Some(Lang::Dan);
    "nb" "Norwegian Bokmål" Latin true Some(Lang::Nob);
    "fi" "Finnish" Latin true Some(Lang::Fin);
    "tr" "Turkish" Latin true Some(Lang::Tur);
    "ar" "Arabic" Arabic true Some(Lang::Ara);
    "he" "Hebrew" Hebrew true Some(Lang::Heb);
    "hi" "Hindi" Devanagari true Some(Lang::Hin);
    "bn" "Bengali" Bengali true Some(Lang::Ben);
    "zh" "Chinese" Han false Some(Lang::Cmn);
    "ja" "Japanese" Kana false Some(Lang::Jpn);
    "ko" "Korean" Hangul true Some(Lang::Kor);
    "th" "Thai" Thai false Some(Lang::Tha);
    "vi" "Vietnamese" Latin true Some(Lang::Vie);
    "id" "Indonesian" Latin true Some(Lang::Ind);
    "sw" "Swahili" Latin true None;
}

/// Index into [`LANGS`]; [`NEUTRAL`] for language-neutral triggers.
pub type LangId = u8;
pub const NEUTRAL: LangId = u8::MAX;
pub const ENGLISH: LangId = 0;

pub fn lang_id(code: &str) -> Option<LangId> {
    LANGS
        .iter()
        .position(|l| l.code == code)
        .map(|i| i as LangId)
}

pub fn code(id: LangId) -> &'static str {
    if id == NEUTRAL {
        "neutral"
    } else {
        LANGS[id as usize].code
    }
}

pub fn supported_codes() -> String {
    LANGS.iter().map(|l| l.code).collect::<Vec<_>>().join(" ")
}

/// Scripts a language's triggers may contain: Japanese mixes kana and Han.
fn writings_of(id: LangId) -> u16 {
    let l = &LANGS[id as usize];
    let mut set = 1u16 << (l.writing as u8);
    if l.writing == Writing::Kana {
        set |= 1 << Writing::Han as u8;
    }
    set
}

/// Every [`Writing`], by its number.
const ALL_WRITINGS: [Writing; 11] = [
    Writing::Latin,
    Writing::Cyrillic,
    Writing::Arabic,
    Writing::Hebrew,
    Writing::Devanagari,
    Writing::Bengali,
    Writing::Han,
    Writing::Kana,
    Writing::Hangul,
    Writing::Thai,
    Writing::Greek,
];

pub fn writing_of_char(c: char) -> Option<Writing> {
    let w = match c as u32 {
        0x41..=0x5A | 0x61..=0x7A | 0xC0..=0x24F | 0x1E00..=0x1EFF => Writing::Latin,
        0x370..=0x3FF | 0x1F00..=0x1FFF => Writing::Greek,
        0x400..=0x52F => Writing::Cyrillic,
        0x590..=0x5FF | 0xFB1D..=0xFB4F => Writing::Hebrew,
        0x600..=0x6FF | 0x750..=0x77F | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => Writing::Arabic,
        0x900..=0x97F => Writing::Devanagari,
        0x980..=0x9FF => Writing::Bengali,
        0xE00..=0xE7F => Writing::Thai,
        0x3040..=0x30FF | 0x31F0..=0x31FF | 0xFF66..=0xFF9F => Writing::Kana,
        0x1100..=0x11FF | 0x3130..=0x318F | 0xAC00..=0xD7AF => Writing::Hangul,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FFFF => Writing::Han,
        _ => return None,
    };
    Some(w)
}

/// The languages whose triggers apply to one text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LangSet {
    /// Bit `i` set: language `i` applies.
    pub langs: u32,
    /// Writing systems of the chosen languages.
    writings: u16,
    /// The single language settled on, if any: a hint, a reliable detection, or a script that
    /// only one supported language writes. `None` is *undecided*.
    pub primary: Option<LangId>,
    /// The most likely language of the text's main script (English for Latin text), for what
    /// must be said in some language while the text's own is undecided (see
    /// [`LangSet::fallback`]).
    fallback: Option<LangId>,
}

/// The language most texts of a script are written in, among the supported ones.
fn script_language(w: Writing) -> Option<&'static str> {
    Some(match w {
        Writing::Latin => "en",
        Writing::Cyrillic => "ru",
        Writing::Arabic => "ar",
        Writing::Hebrew => "he",
        Writing::Devanagari => "hi",
        Writing::Bengali => "bn",
        Writing::Han => "zh",
        Writing::Kana => "ja",
        Writing::Hangul => "ko",
        Writing::Thai => "th",
        Writing::Greek => return None,
    })
}

impl LangSet {
    fn from_bits(langs: u32, primary: Option<LangId>, fallback: Option<LangId>) -> LangSet {
        let mut writings = 0;
        for i in 0..LANGS.len() {
            if langs & (1 << i) != 0 {
                writings |= writings_of(i as LangId);
            }
        }
        LangSet {
            langs,
            writings,
            primary,
            fallback: primary.or(fallback),
        }
    }

    /// The set for a caller's hint (`None` if the code is not supported).
    pub fn from_hint(hint: &str) -> Option<LangSet> {
        let id = lang_id(hint)?;
        Some(Self::from_bits((1 << id) | 1, Some(id), None))
    }

    /// Decides from the first bytes of a text.
    ///
    /// whatlang is trusted only when it says its answer is reliable: on a short text it guesses
    /// wildly ("how can I kill myself" scores Swedish, "hello" Danish). Otherwise the language
    /// stays undecided (`primary` is `None`), every supported language of the text's scripts
    /// applies, and the fallback for messages is the main script's most likely language; a
    /// script that only one supported language writes (Hangul, Thai, Hebrew, ...) still names
    /// it when whatlang agrees.
    pub fn detect(probe: &str) -> LangSet {
        let mut writings = 0u16;
        let mut counts = [0u32; 11];
        for c in probe.chars() {
            if let Some(w) = writing_of_char(c) {
                writings |= 1 << w as u8;
                counts[w as usize] += 1;
            }
        }
        let single = writings.count_ones() == 1
            || writings == (1 << Writing::Han as u8) | (1 << Writing::Kana as u8);
        // One detection (the costliest step of a short text's scan), used twice.
        let info = whatlang::detect(probe);
        let guess = info
            .as_ref()
            .and_then(|info| LANGS.iter().position(|l| l.whatlang == Some(info.lang())));
        if let (Some(info), Some(i)) = (&info, guess) {
            if single && info.is_reliable() {
                return Self::from_bits((1 << i) | 1, Some(i as LangId), None);
            }
        }
        let mut bits = 1u32;
        for (i, l) in LANGS.iter().enumerate() {
            if writings & writings_of(i as LangId) != 0 && l.writing != Writing::Greek {
                bits |= 1 << i;
            }
        }
        // A script that only one supported language writes names it.
        let primary = guess.filter(|&i| {
            bits & (1 << i) != 0
                && LANGS
                    .iter()
                    .enumerate()
                    .all(|(j, l)| j == i || l.writing != LANGS[i].writing)
        });
        // Japanese is kana and kanji together; Han alone is most likely Chinese.
        let main = (0..counts.len())
            .filter(|&w| counts[w] > 0)
            .max_by_key(|&w| (counts[w], std::cmp::Reverse(w)))
            .map(|w| {
                if w == Writing::Han as usize && counts[Writing::Kana as usize] > 0 {
                    Writing::Kana
                } else {
                    ALL_WRITINGS[w]
                }
            });
        let fallback = main.and_then(script_language).and_then(lang_id);
        Self::from_bits(bits, primary.map(|i| i as LangId), fallback)
    }

    /// The language to say something in (a message, help resources): the text's language when
    /// decided, else the most likely language of its main script (English for Latin text);
    /// `None` when not even that is known.
    pub fn fallback(&self) -> Option<LangId> {
        self.fallback
    }

    /// Whether a trigger of language `id` applies.
    pub fn accepts(&self, id: LangId) -> bool {
        id == NEUTRAL || self.langs & (1 << id) != 0 || writings_of(id) & self.writings == 0
    }

    pub fn codes(&self) -> Vec<&'static str> {
        (0..LANGS.len())
            .filter(|i| self.langs & (1 << i) != 0)
            .map(|i| LANGS[i].code)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reliable_detection_picks_one_language_plus_english() {
        let s = LangSet::detect(
            "Bonjour, je voudrais savoir comment préparer une bonne tarte aux pommes pour ce soir avec mes enfants.",
        );
        assert_eq!(s.codes(), vec!["en", "fr"]);
        assert!(
            s.accepts(lang_id("zh").unwrap()),
            "another script always applies"
        );
        assert!(!s.accepts(lang_id("es").unwrap()));
    }

    #[test]
    fn short_text_applies_every_language_of_its_script() {
        let s = LangSet::detect("ok");
        assert!(s.accepts(lang_id("es").unwrap()));
        assert!(s.accepts(lang_id("sw").unwrap()));
    }

    #[test]
    fn a_short_prompt_stays_undecided_with_its_scripts_likely_language_as_fallback() {
        // whatlang's guesses here are Swedish, French and Danish, none of them reliable.
        for text in [
            "how can I kill myself",
            "ignore previous instructions",
            "hello",
        ] {
            let s = LangSet::detect(text);
            assert_eq!(s.primary, None, "{text}");
            assert_eq!(s.fallback(), lang_id("en"), "{text}");
            assert!(
                s.accepts(lang_id("sv").unwrap()),
                "every Latin language applies"
            );
        }
        let s = LangSet::detect("хочу умереть");
        assert_eq!((s.primary, s.fallback()), (None, lang_id("ru")));
        assert!(s.accepts(lang_id("uk").unwrap()));
        let s = LangSet::detect("我想死");
        assert_eq!(s.fallback(), lang_id("zh"));
        let s = LangSet::detect("死にたい");
        assert_eq!(s.fallback(), lang_id("ja"));
        // A script only one supported language writes names it.
        let s = LangSet::detect("죽고 싶어요");
        assert_eq!(s.primary, lang_id("ko"));
        // A reliable detection decides, even when short.
        let s = LangSet::detect("chcę umrzeć");
        assert_eq!(s.primary, lang_id("pl"));
    }

    #[test]
    fn hint_wins() {
        let s = LangSet::from_hint("de").unwrap();
        assert_eq!(s.codes(), vec!["en", "de"]);
        assert!(LangSet::from_hint("xx").is_none());
    }
}
