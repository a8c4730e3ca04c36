use hashbrown::HashMap;

use super::utils::{TrigramsWithPositions, get_trigrams_with_positions, sorted_trigrams};
use super::{ARABIC_LANGS, CYRILLIC_LANGS, DEVANAGARI_LANGS, HEBREW_LANGS, LATIN_LANGS};
use super::{LangProfile, LangProfileList};
use super::{MAX_TOTAL_DISTANCE, MAX_TRIGRAM_DISTANCE, Trigram};
use crate::Lang;
use crate::core::{FilterList, Info, InternalQuery, Text, calculate_confidence};
use crate::scripts::grouping::MultiLangScript;

#[derive(Debug)]
pub struct RawOutcome {
    pub trigrams_count: usize,
    #[allow(dead_code)]
    pub raw_distances: Vec<(Lang, u32)>,
    pub scores: Vec<(Lang, f64)>,
}

#[inline]
pub fn detect(iquery: &InternalQuery) -> Option<Info> {
    let raw_outcome = raw_detect(iquery);
    let RawOutcome {
        trigrams_count,
        scores,
        ..
    } = raw_outcome;

    let mut raw_scores_iter = scores.into_iter();

    let opt_lang_score1 = raw_scores_iter.next();
    let opt_lang_score2 = raw_scores_iter.next();

    // TODO: Logic is duplicated in alphabets. Consider refactoring
    opt_lang_score1.map(|(lang1, score1)| {
        let script = iquery.multi_lang_script.to_script();
        let confidence = if let Some((_, score2)) = opt_lang_score2 {
            calculate_confidence(score1, score2, trigrams_count)
        } else {
            1.0
        };
        Info::new(script, lang1, confidence)
    })
}

#[inline]
pub fn raw_detect(iquery: &InternalQuery) -> RawOutcome {
    let lang_profile_list = script_to_lang_profile_list(iquery.multi_lang_script);
    calculate_scores_in_profiles(
        &iquery.text,
        iquery.filter_list,
        lang_profile_list,
        iquery.multi_lang_script,
    )
}

/// mistguard: for each trigram of a script's profiles, the languages (by index in the profile
/// list) whose profile holds it, and its rank there. Built once per script.
type InvertedIndex = HashMap<Trigram, Vec<(u16, u16)>>;

fn inverted_index(script: MultiLangScript) -> &'static InvertedIndex {
    use std::sync::OnceLock;
    static INDEX: [OnceLock<InvertedIndex>; 5] = [const { OnceLock::new() }; 5];
    let slot = match script {
        MultiLangScript::Latin => 0,
        MultiLangScript::Cyrillic => 1,
        MultiLangScript::Arabic => 2,
        MultiLangScript::Devanagari => 3,
        MultiLangScript::Hebrew => 4,
    };
    INDEX[slot].get_or_init(|| {
        let mut index = InvertedIndex::new();
        for (li, &(_, profile)) in script_to_lang_profile_list(script).iter().enumerate() {
            for (rank, &trigram) in profile.iter().enumerate() {
                index.entry(trigram).or_default().push((li as u16, rank as u16));
            }
        }
        index
    })
}

/// mistguard: when set (only with the `dev` feature), scores are computed the original way, one
/// hash lookup per profile trigram, so a test can compare the two.
#[cfg(feature = "dev")]
pub static REFERENCE_SCORING: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

fn script_to_lang_profile_list(script: MultiLangScript) -> LangProfileList {
    use MultiLangScript as MLS;
    match script {
        MLS::Latin => LATIN_LANGS,
        MLS::Cyrillic => CYRILLIC_LANGS,
        MLS::Arabic => ARABIC_LANGS,
        MLS::Devanagari => DEVANAGARI_LANGS,
        MLS::Hebrew => HEBREW_LANGS,
    }
}

#[inline]
fn calculate_scores_in_profiles(
    text: &Text,
    filter_list: &FilterList,
    lang_profile_list: LangProfileList,
    script: MultiLangScript,
) -> RawOutcome {
    let mut lang_distances: Vec<(Lang, u32)> = vec![];

    #[cfg(feature = "dev")]
    let reference = REFERENCE_SCORING.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "dev"))]
    let reference = false;

    let unique_trigrams_count;
    if reference {
        let TrigramsWithPositions {
            trigram_positions, ..
        } = get_trigrams_with_positions(&text.lowercase());
        unique_trigrams_count = trigram_positions.len();
        for &(lang, lang_trigrams) in lang_profile_list {
            if !filter_list.is_allowed(lang) {
                continue;
            }
            let dist = calculate_distance(lang_trigrams, &trigram_positions);
            lang_distances.push(((lang), dist));
        }
    } else {
        // mistguard: the same distances, from the text's trigrams (a hundred or so) through an
        // inverted index, instead of one lookup per profile trigram (about 15,000 for Latin).
        // A profile trigram absent from the text costs MAX_TRIGRAM_DISTANCE; a present one
        // costs |position in text - rank in profile|.
        let trigrams = sorted_trigrams(&text.lowercase());
        unique_trigrams_count = trigrams.len();
        let index = inverted_index(script);
        let mut present = vec![(0u32, 0u32); lang_profile_list.len()];
        for (n, trigram) in trigrams.iter().enumerate() {
            if let Some(entries) = index.get(trigram) {
                for &(li, rank) in entries {
                    let slot = &mut present[li as usize];
                    slot.0 += 1;
                    slot.1 += (n as i32 - rank as i32).unsigned_abs();
                }
            }
        }
        for (li, &(lang, lang_trigrams)) in lang_profile_list.iter().enumerate() {
            if !filter_list.is_allowed(lang) {
                continue;
            }
            let (found, found_dist) = present[li];
            let total_dist =
                (lang_trigrams.len() as u32 - found) * MAX_TRIGRAM_DISTANCE + found_dist;
            let dist = finish_distance(total_dist, unique_trigrams_count as u32);
            lang_distances.push((lang, dist));
        }
    }

    // Sort languages by distance
    lang_distances.sort_unstable_by_key(|(_, dist)| *dist);

    let max_dist = unique_trigrams_count as u32 * MAX_TRIGRAM_DISTANCE;

    let raw_scores = lang_distances
        .iter()
        .map(|&(lang, distance)| (lang, distance_to_raw_score(distance, max_dist)))
        .collect();

    RawOutcome {
        trigrams_count: unique_trigrams_count,
        scores: raw_scores,
        raw_distances: lang_distances,
    }
}

#[inline]
fn calculate_distance(lang_trigrams: LangProfile, text_trigrams: &HashMap<Trigram, u32>) -> u32 {
    let mut total_dist = 0u32;

    for (i, &trigram) in lang_trigrams.iter().enumerate() {
        let dist = match text_trigrams.get(&trigram) {
            Some(&n) => (n as i32 - i as i32).unsigned_abs(),
            None => MAX_TRIGRAM_DISTANCE,
        };
        total_dist += dist;
    }

    finish_distance(total_dist, text_trigrams.len() as u32)
}

#[inline]
fn finish_distance(mut total_dist: u32, count: u32) -> u32 {
    if MAX_TRIGRAM_DISTANCE > count {
        let delta = MAX_TRIGRAM_DISTANCE - count;
        total_dist -= delta * MAX_TRIGRAM_DISTANCE;
    }

    total_dist.clamp(0, MAX_TOTAL_DISTANCE)
}

#[inline]
fn distance_to_raw_score(distance: u32, max_distance: u32) -> f64 {
    let similarity = max_distance - distance;
    similarity as f64 / max_distance as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_when_german_is_given() {
        let text = "Die Ordnung muss für immer in diesem Codebase bleiben";
        let iq = InternalQuery {
            text: Text::new(text),
            filter_list: &FilterList::default(),
            multi_lang_script: MultiLangScript::Latin,
        };
        let raw_outcome = raw_detect(&iq);

        assert_eq!(raw_outcome.trigrams_count, 50);

        let &(first_lang, first_score) = raw_outcome.scores.first().unwrap();
        let &(_last_lang, last_score) = raw_outcome.scores.last().unwrap();

        assert_eq!(first_lang, Lang::Deu);

        assert!(first_score >= 0.0);
        assert!(first_score <= 1.0);

        assert!(last_score >= 0.0);
        assert!(last_score <= 1.0);
    }
}
