use regex_automata::dfa::{dense, StartKind};
use regex_automata::{nfa::thompson, MatchKind};
fn main() {
    let pats: Vec<String> = std::fs::read_to_string(std::env::args().nth(1).unwrap()).unwrap().lines().map(|s| s.to_string()).collect();
    for (kind, all) in [("all", true), ("leftmost", false)] {
        let t = std::time::Instant::now();
        let d = dense::Builder::new()
            .configure(dense::Config::new().match_kind(if all { MatchKind::All } else { MatchKind::LeftmostFirst }).start_kind(StartKind::Unanchored))
            .syntax(regex_automata::util::syntax::Config::new().utf8(false).unicode(false))
            .thompson(thompson::Config::new().utf8(false))
            .build_many(&pats);
        println!("{kind}: {:?} {:?}", t.elapsed(), d.map(|d| d.memory_usage()));
    }
}
