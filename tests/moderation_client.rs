//! The moderation client (`mistguard::io::moderation`) against the fake Mistral API
//! (`tests/support/fake_mistral.rs`): answers, keys, failures, retries, the breaker, batching,
//! the cache, budgets and limits. Behaviour and request counts only, never wall-clock durations.

mod support;

use mistguard::io::moderation::{
    BreakerState, ClientConfig, Failure, FailureKind, KeySource, Moderator, Request,
};
use std::time::{Duration, SystemTime};
use support::fake_mistral::{Behaviour, FakeMistral, CATEGORIES_2411};
use support::within;

/// Settings for tests: quick backoff, generous timeouts (the machine is shared), a breaker that
/// does not open unless a test wants it to.
fn cfg(fake: &FakeMistral, keys: &str) -> ClientConfig {
    ClientConfig {
        url: fake.url.clone(),
        keys: KeySource {
            list: Some(keys.into()),
            ..Default::default()
        },
        attempt_timeout: Duration::from_secs(5),
        call_timeout: Duration::from_secs(20),
        retries: 2,
        batch_window: Duration::from_millis(1),
        breaker_failures: 100,
        backoff_base: Duration::from_millis(10),
        ..Default::default()
    }
}

fn score(a: &mistguard::io::moderation::Answer, cat: &str) -> f64 {
    a.result.category_scores[cat]
}

/// Moderates the texts concurrently (a batcher with a long window and `batch_size` = their
/// number sends them as one batch); the results in the texts' order.
async fn together(
    m: &Moderator,
    texts: &[String],
) -> Vec<Result<mistguard::io::moderation::Answer, Failure>> {
    let tasks: Vec<_> = texts
        .iter()
        .map(|t| {
            let (m, t) = (m.clone(), t.clone());
            tokio::spawn(async move { m.moderate(&t, None).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(within(t).await.unwrap());
    }
    out
}

fn inputs(fake: &FakeMistral) -> Vec<usize> {
    fake.requests().iter().map(|r| r.inputs).collect()
}

async fn kind_of(m: &Moderator, text: &str) -> FailureKind {
    within(m.moderate(text, None))
        .await
        .expect_err("the call should fail")
        .kind
}

#[tokio::test]
async fn answers_with_both_category_sets_and_both_endpoints() {
    let fake = FakeMistral::start();
    let m = Moderator::new(cfg(&fake, "key-1")).unwrap();
    let a = within(m.moderate("you are #cat:hate_and_discrimination", None))
        .await
        .unwrap();
    assert_eq!(&*a.model, "mistral-moderation-2411");
    assert!(!a.cached);
    assert_eq!(score(&a, "hate_and_discrimination"), 0.97);
    assert!(a.result.categories["hate_and_discrimination"]);
    assert_eq!(score(&a, "sexual"), 0.01);
    assert_eq!(a.result.category_scores.len(), CATEGORIES_2411.len());

    fake.set_default(Behaviour::Ok2603);
    let a = within(m.moderate("ignore all that #cat:jailbreaking", None))
        .await
        .unwrap();
    assert_eq!(&*a.model, "mistral-moderation-2603");
    assert_eq!(score(&a, "jailbreaking"), 0.97);
    assert_eq!(score(&a, "dangerous"), 0.01);
    assert!(!a
        .result
        .category_scores
        .contains_key("dangerous_and_criminal_content"));

    // Direct calls, both endpoints.
    fake.set_default(Behaviour::Ok);
    let r = within(m.send(Request::Texts(vec![
        "a #cat:pii".into(),
        "b #cat:selfharm".into(),
    ])))
    .await
    .unwrap();
    assert_eq!(r.results.len(), 2);
    assert_eq!(r.results[0].category_scores["pii"], 0.97);
    assert_eq!(r.results[1].category_scores["selfharm"], 0.97);
    let r = within(m.send(Request::Chat(vec![vec![
        ("user".into(), "hello #cat:sexual".into()),
        ("assistant".into(), "hi #cat:violence_and_threats".into()),
    ]])))
    .await
    .unwrap();
    assert_eq!(r.results.len(), 1);
    assert_eq!(r.results[0].category_scores["violence_and_threats"], 0.97);
    assert_eq!(r.results[0].category_scores["sexual"], 0.01);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs[0].path, "/v1/moderations");
    assert_eq!(reqs[0].key.as_deref(), Some("key-1"));
    assert_eq!(reqs[0].body["model"], "mistral-moderation-latest");
    assert_eq!(reqs[2].inputs, 2);
    assert_eq!(reqs[3].path, "/v1/chat/moderations");
    assert_eq!(m.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn a_refused_key_is_benched_and_all_refused_is_an_auth_outage() {
    let fake = FakeMistral::start();
    fake.refuse_key("key-a");
    let m = Moderator::new(cfg(&fake, "key-a, key-b")).unwrap();
    assert_eq!(m.keys(), (2, 2));
    within(m.moderate("one", None)).await.unwrap();
    within(m.moderate("two", None)).await.unwrap();
    within(m.moderate("three", None)).await.unwrap();
    let keys: Vec<String> = fake.requests().into_iter().filter_map(|r| r.key).collect();
    assert_eq!(keys, ["key-a", "key-b", "key-b", "key-b"]);
    assert_eq!(m.keys(), (1, 2));

    fake.refuse_all_keys(true);
    fake.clear();
    assert_eq!(kind_of(&m, "four").await, FailureKind::Auth);
    // key-b was tried once, then no usable key was left.
    assert_eq!(fake.count(), 1);
    assert_eq!(m.keys(), (0, 2));
    assert_eq!(kind_of(&m, "five").await, FailureKind::Auth);
    assert_eq!(fake.count(), 1);
    // Auth is not an API failure: the breaker stays closed.
    assert_eq!(m.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn rejections_are_not_retried() {
    let fake = FakeMistral::start();
    let m = Moderator::new(ClientConfig {
        retries: 3,
        ..cfg(&fake, "k")
    })
    .unwrap();
    fake.push(Behaviour::Unprocessable);
    assert_eq!(kind_of(&m, "x").await, FailureKind::Rejected);
    assert_eq!(fake.count(), 1);
    // A 400 on a single text is a rejection too (nothing to split).
    fake.push(Behaviour::Status(400));
    assert_eq!(kind_of(&m, "y").await, FailureKind::Rejected);
    assert_eq!(fake.count(), 2);
    fake.push(Behaviour::Status(404));
    assert_eq!(kind_of(&m, "z").await, FailureKind::Rejected);
    assert_eq!(fake.count(), 3);
    // The texts were not cached as answers: asking again goes out.
    within(m.moderate("x", None)).await.unwrap();
    assert_eq!(fake.count(), 4);
    // An empty text is refused at once, without a request.
    let e = within(m.moderate("", None)).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Rejected);
    assert_eq!(e.detail, "empty text");
    assert_eq!(fake.count(), 4);
}

#[tokio::test]
async fn retry_after_in_seconds_and_as_a_date_is_waited_out() {
    let fake = FakeMistral::start();
    let m = Moderator::new(cfg(&fake, "k")).unwrap();
    fake.push(Behaviour::TooMany { retry_after: 1 });
    let a = within(m.moderate("s #cat:law", None)).await.unwrap();
    assert_eq!(score(&a, "law"), 0.97);
    assert_eq!(fake.count(), 2);

    let fake = FakeMistral::start();
    let m = Moderator::new(cfg(&fake, "k")).unwrap();
    fake.push(Behaviour::TooManyDate { in_secs: 2 });
    within(m.moderate("d", None)).await.unwrap();
    assert_eq!(fake.count(), 2);
}

#[tokio::test]
async fn a_retry_after_past_the_call_time_fails_fast_and_holds_later_calls() {
    let fake = FakeMistral::start();
    let m = Moderator::new(ClientConfig {
        call_timeout: Duration::from_secs(5),
        ..cfg(&fake, "k")
    })
    .unwrap();
    fake.push(Behaviour::TooMany { retry_after: 120 });
    assert_eq!(kind_of(&m, "a").await, FailureKind::RateLimited);
    assert_eq!(fake.count(), 1);
    // Within not_before: no request at all.
    assert_eq!(kind_of(&m, "b").await, FailureKind::RateLimited);
    let e = within(m.send(Request::Texts(vec!["c".into()])))
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::RateLimited);
    assert_eq!(fake.count(), 1);
    // Rate limiting is not an API failure.
    assert_eq!(m.breaker_state(), BreakerState::Closed);

    // The same with Retry-After as a date: RateLimited, at once.
    let fake = FakeMistral::start();
    let m = Moderator::new(ClientConfig {
        call_timeout: Duration::from_secs(5),
        ..cfg(&fake, "k")
    })
    .unwrap();
    fake.push(Behaviour::TooManyDate { in_secs: 120 });
    assert_eq!(kind_of(&m, "a").await, FailureKind::RateLimited);
    assert_eq!(fake.count(), 1);

    // More seconds than anything can wait: no panic, RateLimited, later calls held.
    let fake = FakeMistral::start();
    let m = Moderator::new(cfg(&fake, "k")).unwrap();
    fake.push(Behaviour::TooMany {
        retry_after: u64::MAX,
    });
    assert_eq!(kind_of(&m, "a").await, FailureKind::RateLimited);
    assert_eq!(kind_of(&m, "b").await, FailureKind::RateLimited);
    assert_eq!(fake.count(), 1);

    // A 503 with a Retry-After past the call's time: Server, at once, and later calls are not
    // held (only a 429 sets the wait for every call).
    let fake = FakeMistral::start();
    let m = Moderator::new(ClientConfig {
        call_timeout: Duration::from_secs(5),
        ..cfg(&fake, "k")
    })
    .unwrap();
    fake.push(Behaviour::Unavailable { retry_after: 120 });
    let e = within(m.moderate("a", None)).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Server);
    assert!(e.detail.contains("503"), "{e}");
    assert_eq!(fake.count(), 1);
    within(m.moderate("b", None)).await.unwrap();
    assert_eq!(fake.count(), 2);
}

#[tokio::test]
async fn a_503_with_a_retry_after_that_fits_is_retried_after_it() {
    let fake = FakeMistral::start();
    let m = Moderator::new(cfg(&fake, "k")).unwrap();
    fake.push(Behaviour::Unavailable { retry_after: 1 });
    let a = within(m.moderate("u #cat:health", None)).await.unwrap();
    assert_eq!(score(&a, "health"), 0.97);
    assert_eq!(fake.count(), 2);
    assert_eq!(m.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn server_errors_are_retried_then_given_up() {
    let fake = FakeMistral::start();
    let m = Moderator::new(cfg(&fake, "k")).unwrap();
    fake.push(Behaviour::Status(500));
    within(m.moderate("a", None)).await.unwrap();
    assert_eq!(fake.count(), 2);

    fake.clear();
    fake.set_default(Behaviour::Status(503));
    let e = within(m.moderate("b", None)).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Server);
    assert!(e.detail.contains("503"), "{e}");
    // retries = 2: three requests.
    assert_eq!(fake.count(), 3);
}

#[tokio::test]
async fn a_slow_api_times_out_within_the_call_time() {
    let fake = FakeMistral::start();
    fake.set_default(Behaviour::Slow(Duration::from_secs(30)));
    let m = Moderator::new(ClientConfig {
        attempt_timeout: Duration::from_millis(300),
        call_timeout: Duration::from_secs(1),
        retries: 10,
        ..cfg(&fake, "k")
    })
    .unwrap();
    assert_eq!(kind_of(&m, "slow").await, FailureKind::Timeout);
    // Retried while the call had time, never past it.
    let n = fake.count();
    assert!((1..=10).contains(&n), "{n}");
}

#[tokio::test]
async fn a_connection_reset_is_a_network_error_and_is_retried() {
    let fake = FakeMistral::start();
    let m = Moderator::new(ClientConfig {
        retries: 1,
        ..cfg(&fake, "k")
    })
    .unwrap();
    fake.push(Behaviour::Reset);
    within(m.moderate("a #cat:financial", None)).await.unwrap();
    assert_eq!(fake.count(), 2);

    let fake = FakeMistral::start();
    let m = Moderator::new(ClientConfig {
        retries: 0,
        ..cfg(&fake, "k")
    })
    .unwrap();
    fake.push(Behaviour::Reset);
    assert_eq!(kind_of(&m, "b").await, FailureKind::Network);
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn malformed_answers_and_wrong_lengths_are_malformed() {
    let fake = FakeMistral::start();
    let m = Moderator::new(cfg(&fake, "k")).unwrap();
    fake.push(Behaviour::Malformed);
    assert_eq!(kind_of(&m, "a").await, FailureKind::Malformed);
    fake.push(Behaviour::WrongLength);
    assert_eq!(kind_of(&m, "b").await, FailureKind::Malformed);
    assert_eq!(fake.count(), 2);
}

#[tokio::test]
async fn the_breaker_opens_fails_fast_then_a_probe_closes_it() {
    let fake = FakeMistral::start();
    fake.set_default(Behaviour::Status(500));
    let m = Moderator::new(ClientConfig {
        retries: 0,
        breaker_failures: 2,
        breaker_cooldown: Duration::from_secs(2),
        ..cfg(&fake, "k")
    })
    .unwrap();
    assert_eq!(kind_of(&m, "a").await, FailureKind::Server);
    assert_eq!(m.breaker_state(), BreakerState::Closed);
    assert_eq!(kind_of(&m, "b").await, FailureKind::Server);
    assert_eq!(m.breaker_state(), BreakerState::Open);
    assert_eq!(kind_of(&m, "c").await, FailureKind::BreakerOpen);
    let e = within(m.send(Request::Texts(vec!["d".into()])))
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::BreakerOpen);
    assert_eq!(fake.count(), 2);
    // After the cooldown: half-open, one probe goes out and its success closes the breaker.
    while m.breaker_state() == BreakerState::Open {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(m.breaker_state(), BreakerState::HalfOpen);
    fake.set_default(Behaviour::Ok);
    within(m.moderate("e", None)).await.unwrap();
    assert_eq!(fake.count(), 3);
    assert_eq!(m.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn concurrent_texts_are_batched_and_each_caller_gets_its_own_result() {
    let fake = FakeMistral::start();
    let m = Moderator::new(ClientConfig {
        batch_window: Duration::from_millis(200),
        ..cfg(&fake, "k")
    })
    .unwrap();
    let mut tasks = Vec::new();
    for (i, cat) in CATEGORIES_2411.iter().take(8).enumerate() {
        let m = m.clone();
        let text = format!("text {i} #cat:{cat}");
        tasks.push(tokio::spawn(
            async move { (cat, m.moderate(&text, None).await) },
        ));
    }
    for t in tasks {
        let (cat, r) = within(t).await.unwrap();
        let a = r.unwrap();
        for c in CATEGORIES_2411 {
            let want = if c == cat { 0.97 } else { 0.01 };
            assert_eq!(score(&a, c), want, "{cat}: {c}");
        }
    }
    let reqs = fake.requests();
    assert!(reqs.len() < 8, "{} requests", reqs.len());
    assert_eq!(reqs.iter().map(|r| r.inputs).sum::<usize>(), 8);
}

/// A client whose batcher sends four concurrent texts as one batch.
fn batching(fake: &FakeMistral) -> ClientConfig {
    ClientConfig {
        batch_size: 4,
        batch_window: Duration::from_secs(2),
        ..cfg(fake, "k")
    }
}

fn four(prefix: &str) -> Vec<String> {
    CATEGORIES_2411
        .iter()
        .take(4)
        .map(|c| format!("{prefix} #cat:{c}"))
        .collect()
}

fn assert_answers(
    texts: &[String],
    results: &[Result<mistguard::io::moderation::Answer, Failure>],
) {
    for (i, r) in results.iter().enumerate() {
        let a = r.as_ref().unwrap_or_else(|e| panic!("text {i}: {e}"));
        assert_eq!(score(a, CATEGORIES_2411[i]), 0.97, "{}", texts[i]);
    }
}

#[tokio::test]
async fn a_refused_batch_halves_the_batch_size_is_split_and_the_size_grows_back() {
    let fake = FakeMistral::start();
    let m = Moderator::new(batching(&fake)).unwrap();
    assert_eq!(m.batch_limit(), 4);
    fake.push(Behaviour::Status(413));
    let texts = four("split");
    assert_answers(&texts, &together(&m, &texts).await);
    // The refused batch went out again in two halves, and the batch size was halved.
    assert_eq!(inputs(&fake), [4, 2, 2]);
    assert_eq!(m.batch_limit(), 2);

    // 64 batches answered in a row (the two halves, then 62 pairs) double it again.
    for i in 0..62 {
        let pair = vec![format!("pair {i} a"), format!("pair {i} b")];
        for r in together(&m, &pair).await {
            r.unwrap();
        }
        let want = if i < 61 { 2 } else { 4 };
        assert_eq!(m.batch_limit(), want, "after pair {i}");
    }
    assert_eq!(fake.count(), 3 + 62);
    assert!(inputs(&fake)[3..].iter().all(|&n| n == 2));
    // And batches of four go out again.
    fake.clear();
    let texts = four("again");
    assert_answers(&texts, &together(&m, &texts).await);
    assert_eq!(inputs(&fake), [4]);
}

#[tokio::test]
async fn a_batch_refused_with_422_is_bisected_without_halving_the_batch_size() {
    let fake = FakeMistral::start();
    let m = Moderator::new(batching(&fake)).unwrap();
    fake.push(Behaviour::Status(422));
    let texts = four("halves");
    assert_answers(&texts, &together(&m, &texts).await);
    assert_eq!(inputs(&fake), [4, 2, 2]);
    assert_eq!(m.batch_limit(), 4);
}

#[tokio::test]
async fn one_refused_text_fails_alone_and_the_others_are_answered() {
    let fake = FakeMistral::start();
    fake.set_default(Behaviour::RejectText("poison".into()));
    let m = Moderator::new(batching(&fake)).unwrap();
    let mut texts = four("fine");
    texts[2] = "poison".into();
    let results = together(&m, &texts).await;
    for (i, r) in results.iter().enumerate() {
        if i == 2 {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.kind, FailureKind::Rejected, "{e}");
            assert!(e.detail.contains("422"), "{e}");
        } else {
            let a = r.as_ref().unwrap_or_else(|e| panic!("text {i}: {e}"));
            assert_eq!(score(a, CATEGORIES_2411[i]), 0.97);
        }
    }
    // 4 → 2 + 2 → the half with the bad text → 1 + 1.
    let mut sizes = inputs(&fake);
    assert_eq!(sizes.len(), 5, "{sizes:?}");
    sizes.sort_unstable();
    assert_eq!(sizes, [1, 1, 2, 2, 4]);
    let lone: Vec<Vec<String>> = fake
        .requests()
        .into_iter()
        .filter(|r| r.inputs == 1)
        .map(|r| r.texts)
        .collect();
    assert!(lone.contains(&vec!["poison".to_string()]), "{lone:?}");
    // A 422 does not halve the batch size.
    assert_eq!(m.batch_limit(), 4);
    // The bad text alone: Rejected, one request; nothing was cached for it.
    fake.clear();
    assert_eq!(kind_of(&m, "poison").await, FailureKind::Rejected);
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn a_batch_over_the_tokens_per_minute_is_split_not_failed() {
    let fake = FakeMistral::start();
    let m = Moderator::new(ClientConfig {
        tokens_per_minute: 1000,
        ..batching(&fake)
    })
    .unwrap();
    // 253 estimated tokens each: 1012 together, over the 1000 a minute; 506 per half.
    let texts: Vec<String> = four("big")
        .into_iter()
        .map(|t| format!("{t} {}", "x".repeat(1012 - t.len() - 1)))
        .collect();
    assert!(texts.iter().all(|t| t.len() == 1012));
    assert_answers(&texts, &together(&m, &texts).await);
    // The whole batch never went out; its halves did.
    assert_eq!(inputs(&fake), [2, 2]);
    assert_eq!(m.batch_limit(), 4);
}

#[tokio::test]
async fn the_cache_answers_identical_texts_without_a_request() {
    let fake = FakeMistral::start();
    let m = Moderator::new(cfg(&fake, "k")).unwrap();
    let a = within(m.moderate("hello #cat:pii", None)).await.unwrap();
    assert!(!a.cached);
    let b = within(m.moderate("hello #cat:pii", None)).await.unwrap();
    assert!(b.cached);
    assert_eq!(a.result, b.result);
    assert_eq!(b.model, a.model);
    assert_eq!(fake.count(), 1);
    // Another text: a miss.
    within(m.moderate("hello #cat:pii!", None)).await.unwrap();
    assert_eq!(fake.count(), 2);
    // Another model (another client): a miss, and the model is sent.
    let m2 = Moderator::new(ClientConfig {
        model: "mistral-moderation-2603".into(),
        ..cfg(&fake, "k")
    })
    .unwrap();
    within(m2.moderate("hello #cat:pii", None)).await.unwrap();
    assert_eq!(fake.count(), 3);
    assert_eq!(fake.requests()[2].body["model"], "mistral-moderation-2603");
    // A client without a cache asks every time.
    let m3 = Moderator::new(ClientConfig {
        cache_entries: 0,
        ..cfg(&fake, "k")
    })
    .unwrap();
    within(m3.moderate("same", None)).await.unwrap();
    let c = within(m3.moderate("same", None)).await.unwrap();
    assert!(!c.cached);
    assert_eq!(fake.count(), 5);
    // Expired entries are misses.
    let m4 = Moderator::new(ClientConfig {
        cache_ttl: Duration::ZERO,
        ..cfg(&fake, "k")
    })
    .unwrap();
    within(m4.moderate("same", None)).await.unwrap();
    within(m4.moderate("same", None)).await.unwrap();
    assert_eq!(fake.count(), 7);
}

#[tokio::test]
async fn budgets_refuse_a_subject_over_its_budget_and_the_total() {
    let fake = FakeMistral::start();
    let m = Moderator::new(ClientConfig {
        subject_budget_tokens_per_hour: 100,
        ..cfg(&fake, "k")
    })
    .unwrap();
    let text = |c: char| c.to_string().repeat(300); // 75 tokens
    within(m.moderate(&text('a'), Some("s1"))).await.unwrap();
    let e = within(m.moderate(&text('b'), Some("s1")))
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Budget);
    within(m.moderate(&text('c'), Some("s2"))).await.unwrap();
    // A cache hit costs nothing.
    let a = within(m.moderate(&text('a'), Some("s1"))).await.unwrap();
    assert!(a.cached);
    // No subject: only the total budget applies (none here).
    within(m.moderate(&text('d'), None)).await.unwrap();
    assert_eq!(fake.count(), 3);

    // A total budget smaller than one text.
    let m = Moderator::new(ClientConfig {
        budget_tokens_per_hour: 10,
        ..cfg(&fake, "k")
    })
    .unwrap();
    let e = within(m.moderate(&text('e'), None)).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Budget);
    within(m.moderate("small", None)).await.unwrap();
    assert_eq!(fake.count(), 4);
}

#[tokio::test]
async fn client_side_limits_fail_when_the_wait_does_not_fit() {
    let fake = FakeMistral::start();
    let m = Moderator::new(ClientConfig {
        requests_per_minute: 1,
        call_timeout: Duration::from_secs(5),
        ..cfg(&fake, "k")
    })
    .unwrap();
    within(m.moderate("a", None)).await.unwrap();
    assert_eq!(kind_of(&m, "b").await, FailureKind::ClientLimit);
    assert_eq!(fake.count(), 1);

    let m = Moderator::new(ClientConfig {
        tokens_per_minute: 10,
        ..cfg(&fake, "k")
    })
    .unwrap();
    assert_eq!(
        kind_of(&m, &"x".repeat(100)).await,
        FailureKind::ClientLimit
    );
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn the_key_file_is_read_again_when_it_changes() {
    let fake = FakeMistral::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    std::fs::write(&path, "# the keys\n\nkey-file-a\n").unwrap();
    let m = Moderator::new(ClientConfig {
        keys: KeySource {
            file: Some(path.clone()),
            ..Default::default()
        },
        ..cfg(&fake, "")
    })
    .unwrap();
    assert_eq!(m.keys(), (1, 1));
    within(m.moderate("one", None)).await.unwrap();
    std::fs::write(&path, "key-file-b\n").unwrap();
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(10))
        .unwrap();
    drop(f);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The background task looks every second; on a loaded machine its read may land a little
    // after the sleep: ask until the new key is used (bounded by `within`).
    within(async {
        for i in 0.. {
            within(m.moderate(&format!("two {i}"), None)).await.unwrap();
            let last = fake.requests().pop().and_then(|r| r.key);
            if last.as_deref() == Some("key-file-b") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let keys: Vec<String> = fake.requests().into_iter().filter_map(|r| r.key).collect();
    assert_eq!(keys.first().map(String::as_str), Some("key-file-a"));
    assert_eq!(keys.last().map(String::as_str), Some("key-file-b"));
    assert_eq!(m.keys(), (1, 1));

    // The file disappears (a secret mount being swapped): the keys read last stay.
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(m.keys(), (1, 1));
    fake.clear();
    within(m.moderate("three", None)).await.unwrap();
    let keys: Vec<String> = fake.requests().into_iter().filter_map(|r| r.key).collect();
    assert_eq!(keys, ["key-file-b"]);
}

#[tokio::test]
async fn no_key_anywhere_fails_without_a_request() {
    let fake = FakeMistral::start();
    let m = Moderator::new(cfg(&fake, " , ")).unwrap();
    assert_eq!(m.keys(), (0, 0));
    assert_eq!(kind_of(&m, "a").await, FailureKind::NoKeys);
    let e = within(m.send(Request::Texts(vec!["b".into()])))
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::NoKeys);
    assert_eq!(fake.count(), 0);
}

#[tokio::test]
async fn a_canary_key_never_shows() {
    const CANARY: &str = "sk-canary-3f9c1d";
    // Every log line of this test (current-thread runtime: the batcher runs on this thread too),
    // down to TRACE, including reqwest's and hyper's.
    let logs = Logs::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(logs.clone())
            .finish(),
    );
    let fake = FakeMistral::start();
    let c = ClientConfig {
        keys: KeySource {
            single: Some(CANARY.into()),
            list: Some(format!("{CANARY},other-{CANARY}")),
            file: None,
        },
        retries: 0,
        ..cfg(&fake, "")
    };
    assert!(!format!("{c:?}").contains(CANARY));
    let m = Moderator::new(c).unwrap();
    assert!(!format!("{m:?}").contains(CANARY));
    let mut failures: Vec<Failure> = Vec::new();
    for (i, b) in [
        Behaviour::Status(500),
        Behaviour::Unprocessable,
        Behaviour::Malformed,
        Behaviour::WrongLength,
        Behaviour::Reset,
        Behaviour::TooMany { retry_after: 0 },
    ]
    .into_iter()
    .enumerate()
    {
        fake.push(b);
        failures.push(
            within(m.moderate(&format!("text {i} {CANARY}"), None))
                .await
                .unwrap_err(),
        );
    }
    fake.refuse_all_keys(true);
    failures.push(within(m.moderate("last", None)).await.unwrap_err());
    assert_eq!(failures.last().unwrap().kind, FailureKind::Auth);
    for f in &failures {
        let shown = format!("{f} {f:?}");
        assert!(!shown.contains(CANARY), "{shown}");
        // Nor the text (which held the canary too).
        assert!(!shown.contains("text "), "{shown}");
    }
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(logged.contains("moderation"), "nothing was logged");
    assert!(!logged.contains(CANARY), "{logged}");
    assert!(!logged.contains("text 1"), "{logged}");
    // The fake did see the key: it was really used.
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.key.as_deref() == Some(CANARY)));
}

/// A log sink for tests.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}
