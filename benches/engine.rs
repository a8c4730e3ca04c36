//! Scanning-engine throughput on a mixed-language corpus the bench generates itself, with the
//! bundled rulesets: the whole engine (normalize, language, scan, score) on whole texts and on
//! streams cut into 4-, 16- and 256-byte chunks, next to aho-corasick's raw scan of the same
//! literal patterns over the same text. Also prints the bytes of state one stream holds.
//!
//! `cargo bench --bench engine` (add `-- --quick` for a short run).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mistguard::rules::TriggerKind;
use mistguard::{ClassifyOptions, Engine};
use std::hint::black_box;
use std::sync::Arc;

/// Everyday words per language (written for this bench), so the corpus looks like prose in many
/// scripts without being anyone's text.
const WORDS: &[(&str, &str)] = &[
    ("en", "the weather today is mild and the team will meet after lunch to review the quarterly report and plan next steps"),
    ("fr", "le temps est doux aujourd hui et l équipe se réunira après le déjeuner pour revoir le rapport trimestriel"),
    ("de", "das Wetter ist heute mild und das Team trifft sich nach dem Mittagessen um den Quartalsbericht zu besprechen"),
    ("es", "el tiempo es templado hoy y el equipo se reunirá después del almuerzo para revisar el informe trimestral"),
    ("ru", "сегодня мягкая погода и команда встретится после обеда чтобы обсудить квартальный отчёт и следующие шаги"),
    ("zh", "今天天气温和团队将在午饭后开会讨论季度报告并计划下一步工作"),
    ("ja", "今日は穏やかな天気でチームは昼食後に集まり四半期報告を確認して次の段階を計画します"),
    ("ar", "الطقس معتدل اليوم وسيجتمع الفريق بعد الغداء لمراجعة التقرير الفصلي وتخطيط الخطوات التالية"),
    ("hi", "आज मौसम सुहावना है और टीम दोपहर के भोजन के बाद तिमाही रिपोर्ट की समीक्षा करेगी"),
    ("ko", "오늘 날씨는 온화하고 팀은 점심 식사 후에 모여 분기 보고서를 검토할 것입니다"),
    ("th", "วันนี้อากาศดีและทีมจะประชุมหลังอาหารกลางวันเพื่อทบทวนรายงานรายไตรมาส"),
    ("code", "def handler(event): rows = db.query(sql, params); return {\"status\": 200, \"rows\": len(rows)}"),
];

/// About `size` bytes of paragraphs in rotating languages, one trigger phrase every ~4 KiB
/// (`with_triggers`) or none.
fn corpus(engine: &Engine, size: usize, with_triggers: bool) -> String {
    let phrases: Vec<&String> = engine
        .ruleset()
        .triggers
        .iter()
        .filter_map(|t| match &t.kind {
            TriggerKind::Phrases(p) => p.first(),
            _ => None,
        })
        .collect();
    let mut out = String::with_capacity(size + 512);
    let mut i = 0usize;
    while out.len() < size {
        let (_, text) = WORDS[i % WORDS.len()];
        out.push_str(text);
        out.push_str(". ");
        if with_triggers && i % 30 == 29 {
            out.push_str(phrases[(i * 7919) % phrases.len()]);
            out.push_str(". ");
        }
        if i % 6 == 5 {
            out.push('\n');
        }
        i += 1;
    }
    out
}

/// About `size` bytes of benign log lines: timestamps, ids, status codes, latencies.
fn log_text(size: usize) -> String {
    let mut out = String::with_capacity(size + 128);
    let mut x: u64 = 12345;
    let mut next = |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    while out.len() < size {
        out.push_str(&format!(
            "2026-11-{:02} {:02}:{:02}:{:02} INFO request_id={} status=200 latency_ms={} bytes={}\n",
            10 + next(20),
            next(24),
            next(60),
            next(60),
            1_000_000 + next(9_000_000),
            1 + next(999),
            100 + next(99_900)
        ));
    }
    out.truncate(size);
    out
}

fn literal_patterns(engine: &Engine) -> Vec<String> {
    engine
        .ruleset()
        .triggers
        .iter()
        .filter_map(|t| match &t.kind {
            TriggerKind::Phrases(p) => Some(p.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn chunks(text: &str, n: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let mut end = (at + n).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(&text[at..end]);
        at = end;
    }
    out
}

fn bench(c: &mut Criterion) {
    let engine = Arc::new(Engine::bundled().expect("bundled rulesets"));
    // The same rules without the learned tier: the tier's cost is the ratio of the two.
    let rules_only = Arc::new(
        Engine::from_ruleset(mistguard::rules::load_bundled().unwrap()).expect("bundled rules"),
    );
    let text = corpus(&engine, 2 << 20, true);
    let opts = ClassifyOptions::default();

    // The model: load time (median of 9) and memory.
    {
        let mut times: Vec<f64> = (0..9)
            .map(|_| {
                let t = std::time::Instant::now();
                let m = mistguard::learned::Model::from_bytes(
                    mistguard::learned::BUNDLED_MODEL,
                    "bench",
                )
                .unwrap();
                black_box(&m);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let m = mistguard::learned::bundled();
        eprintln!(
            "model: file {} KiB, in memory {} KiB, load {:.1} ms (median of 9)",
            m.file_bytes / 1024,
            m.memory_bytes() / 1024,
            times[4]
        );
    }

    // State of one stream (mean and most over every chunk of 256 KiB in 16-byte chunks) and the
    // bytes it holds back behind those received — printed, not timed.
    let benign = corpus(&engine, 256 << 10, false);
    let fresh = engine.session(&opts);
    eprintln!(
        "state bytes of a fresh stream: {} {:?}",
        fresh.state_bytes(),
        fresh.state_parts()
    );
    for (text, discard, what) in [
        (
            &benign,
            true,
            "benign prose, hits not kept (the daemon's streams)",
        ),
        (&text, true, "a trigger every ~4 KiB, hits not kept"),
        (
            &text,
            false,
            "a trigger every ~4 KiB, hits kept for a verdict",
        ),
    ] {
        let mut cut = (256 << 10).min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut s = engine.session(&opts);
        if discard {
            s.discard_verdict_hits();
        }
        let (mut sum, mut most, mut steps, mut fed) = (0, 0, 0, 0u64);
        let mut held = Vec::new();
        for ch in chunks(&text[..cut], 16) {
            fed += ch.len() as u64;
            let step = s.feed(ch);
            held.push(fed - step.release_offset);
            sum += s.state_bytes();
            most = most.max(s.state_bytes());
            steps += 1;
        }
        held.sort_unstable();
        eprintln!(
            "{what}: state bytes mean {} most {} end {} {:?}; bytes held back mean {:.0} p99 {}",
            sum / steps,
            most,
            s.state_bytes(),
            s.state_parts(),
            held.iter().sum::<u64>() as f64 / held.len() as f64,
            held[held.len() * 99 / 100]
        );
    }

    // The start of a stream, while its language is undecided (the first PROBE_BYTES): each
    // language's paragraph, and a prose opener with a SQL anchor word in it ("here ").
    {
        let mut held = Vec::new();
        let mut starts: Vec<String> = WORDS.iter().map(|(_, t)| t.repeat(3)).collect();
        starts.push(
            "And here is the summary you asked for: where the budget goes, and why. ".repeat(4),
        );
        for text in &starts {
            let mut s = engine.session(&opts);
            let mut fed = 0u64;
            for ch in chunks(text, 16) {
                fed += ch.len() as u64;
                let step = s.feed(ch);
                if fed <= 2 * mistguard::lang::PROBE_BYTES as u64 {
                    held.push(fed - step.release_offset);
                }
            }
        }
        eprintln!(
            "stream starts ({} texts, 16-byte chunks, first {} bytes; the language is decided at {}): bytes held back mean {:.0} most {}",
            starts.len(),
            2 * mistguard::lang::PROBE_BYTES,
            mistguard::lang::PROBE_BYTES,
            held.iter().sum::<u64>() as f64 / held.len() as f64,
            held.iter().max().unwrap()
        );
    }

    let mut g = c.benchmark_group("scan");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(text.len() as u64));

    let patterns = literal_patterns(&engine);
    let ac_default = aho_corasick::AhoCorasick::new(&patterns).unwrap();
    let ac_dfa = aho_corasick::AhoCorasick::builder()
        .kind(Some(aho_corasick::AhoCorasickKind::DFA))
        .build(&patterns)
        .unwrap();
    g.bench_function("baseline/aho-corasick-default-overlapping", |b| {
        b.iter(|| black_box(ac_default.find_overlapping_iter(&text).count()))
    });
    g.bench_function("baseline/aho-corasick-dfa-overlapping", |b| {
        b.iter(|| black_box(ac_dfa.find_overlapping_iter(&text).count()))
    });
    g.bench_function("engine/block", |b| {
        b.iter(|| black_box(engine.classify(&text, &opts).hits.len()))
    });
    g.bench_function("engine/block-rules-only", |b| {
        b.iter(|| black_box(rules_only.classify(&text, &opts).hits.len()))
    });
    {
        let model = mistguard::learned::bundled();
        g.bench_function("learned/score-text-alone", |b| {
            b.iter(|| black_box(mistguard::learned::score_text(&model, &text).len()))
        });
    }
    // Many short texts, as the daemon sees them: per-call cost (session, language, verdict)
    // on top of the scan.
    let small = chunks(&text, 1024);
    let small = &small[..small.len().min(512)];
    let small_bytes: usize = small.iter().map(|s| s.len()).sum();
    g.throughput(Throughput::Bytes(small_bytes as u64));
    g.bench_function("engine/classify-1KiB-texts", |b| {
        b.iter(|| {
            small
                .iter()
                .map(|t| engine.classify(t, &opts).hits.len())
                .sum::<usize>()
        })
    });
    // The daemon bench's text: one benign English paragraph, 1 KiB.
    let en = mistguard::daemon::bench::sample_text(1024);
    g.throughput(Throughput::Bytes(en.len() as u64));
    g.bench_function("engine/classify-1KiB-english", |b| {
        b.iter(|| black_box(engine.classify(black_box(&en), &opts).hits.len()))
    });
    g.bench_function("engine/classify-1KiB-english-rules-only", |b| {
        b.iter(|| black_box(rules_only.classify(black_box(&en), &opts).hits.len()))
    });
    // Numeric text (log lines): digits anchor the phone, card and IBAN shapes.
    let log = log_text(1024);
    g.throughput(Throughput::Bytes(log.len() as u64));
    g.bench_function("engine/classify-1KiB-log", |b| {
        b.iter(|| black_box(engine.classify(black_box(&log), &opts).hits.len()))
    });
    g.throughput(Throughput::Bytes(text.len() as u64));
    for n in [4usize, 16, 256] {
        let parts = chunks(&text, n);
        g.bench_with_input(BenchmarkId::new("engine/stream", n), &parts, |b, parts| {
            b.iter(|| {
                let mut s = engine.session(&opts);
                let mut hits = 0;
                for p in parts {
                    hits += s.feed(p).hits.len();
                }
                hits += s.finish().hits.len();
                black_box(hits)
            })
        });
    }
    // A completion as the daemon streams it (issue 16): the output-only triggers apply, every
    // step composes its `released_text`, and canaries are looked for; then with a protected
    // system prompt too. Ratios to `engine/stream/16` in the same run are their cost.
    let parts = chunks(&text, 16);
    let key = mistguard::leak::LeakKey::new([7; 32]);
    let output = |protected: bool| mistguard::ClassifyOptions {
        direction: mistguard::Direction::Output,
        leak: Some(mistguard::engine::LeakOptions {
            key: key.clone(),
            protected: if protected {
                vec![std::sync::Arc::new(
                    mistguard::leak::Protected::new(
                        &key,
                        &mistguard::daemon::bench::sample_text(2048),
                    )
                    .unwrap(),
                )]
            } else {
                Vec::new()
            },
            canaries: true,
        }),
        ..opts.clone()
    };
    for (name, o) in [
        ("engine/stream-output", output(false)),
        ("engine/stream-output-protected", output(true)),
    ] {
        g.bench_with_input(BenchmarkId::new(name, 16), &parts, |b, parts| {
            b.iter(|| {
                let mut s = engine.session(&o);
                s.compose_released_text();
                let mut out = 0;
                for p in parts {
                    out += s.feed(p).released_text.map_or(0, |t| t.len());
                }
                out += s.finish().released_text.map_or(0, |t| t.len());
                black_box(out)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
