//! Per-subject state shared across replicas through a real Redis (issue 18): exact counts with
//! three daemons, a Redis outage in the middle of a load, suspensions that survive a restart,
//! per-subject limits, the review queue, and bad Redis configuration at start-up.

mod support;

use mistguard::daemon::pb::{self, admin_client::AdminClient};
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;
use tonic::transport::Channel;
use tonic::Request;

fn admin_tokens(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("admin.tokens");
    std::fs::write(&p, "admin-token-0123456789abcdef reviewer sec\n").unwrap();
    p
}

fn admin<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        "Bearer admin-token-0123456789abcdef".parse().unwrap(),
    );
    r
}

async fn admin_client(addr: std::net::SocketAddr) -> AdminClient<Channel> {
    AdminClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

async fn scrape_value(p: &Process, name: &str, parts: &[&str]) -> f64 {
    metric_value(&scrape(p.metrics_addr).await, name, parts)
}

/// Three daemons share one Redis; 3,000 concurrent violations from one subject, a third on each:
/// the subject is suspended exactly once, at exactly `level2_hits`, and the review queue holds
/// the decision ids that did it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_count_one_subject_exactly() {
    let redis = RedisServer::start();
    let rules = TestRules::new();
    let dir = tempfile::tempdir().unwrap();
    let key = shared_subject_key(dir.path());
    let tokens = admin_tokens(dir.path());
    let url = redis.url();
    let args = [
        "--redis-url",
        &url,
        "--redis-timeout",
        "2s",
        "--subject-key-file",
        key.to_str().unwrap(),
        "--escalation-level2-hits",
        "50",
        "--max-inflight",
        "4096",
        "--admin-tokens-file",
        tokens.to_str().unwrap(),
    ];
    let daemons: Vec<Process> = (0..3)
        .map(|_| Process::spawn(rules.path(), &args))
        .collect();
    let blocked = format!("I think {BLOCK_PHRASE}.");
    let mut tasks = Vec::new();
    for d in &daemons {
        let client = d.client().await;
        for _ in 0..1000 {
            let mut c = client.clone();
            let r = subject_req(&blocked, "user-many-replicas");
            tasks.push(tokio::spawn(async move {
                within(c.classify(r)).await.map(|r| r.into_inner())
            }));
        }
    }
    let mut levels = [0usize; 4];
    for t in tasks {
        let r = t.await.unwrap().expect("every call is answered");
        assert_eq!(r.action, pb::Action::Block as i32);
        levels[r.escalation_level as usize] += 1;
    }
    assert_eq!(levels[1], 49, "levels: {levels:?}");
    assert_eq!(levels[2] + levels[3], 3000 - 49, "levels: {levels:?}");
    let mut suspensions = 0.0;
    for d in &daemons {
        suspensions += scrape_value(d, "mistguard_escalation_level2_total", &[]).await;
    }
    assert_eq!(suspensions, 1.0, "one suspension across the replicas");
    // The review queue, from any replica: one subject, 50 record ids, RULE-MIST-001 counted.
    let mut a = admin_client(daemons[2].addr).await;
    let list = within(a.list_reviews(admin(pb::ListReviewsRequest { limit: 0 })))
        .await
        .unwrap()
        .into_inner()
        .reviews;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].record_ids.len(), 50);
    assert!(list[0]
        .rules
        .iter()
        .any(|c| c.rule_id == "RULE-MIST-001" && c.count >= 50));
    assert_eq!(list[0].subject_hash.len(), 32);
    // Lifted on one replica (the hash in upper case is the same subject), lifted on all.
    within(a.lift_suspension(admin(pb::LiftSuspensionRequest {
        subject_hash: list[0].subject_hash.to_uppercase(),
        note: "reviewed".into(),
    })))
    .await
    .unwrap();
    let mut c = daemons[0].client().await;
    let r = within(c.classify(subject_req("hello there", "user-many-replicas")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32, "{r:?}");
    let left = within(a.list_reviews(admin(pb::ListReviewsRequest { limit: 0 })))
        .await
        .unwrap()
        .into_inner()
        .reviews;
    assert!(left.is_empty(), "{left:?}");
}

/// Distinct subjects reaching level 2 on three replicas raise the level-3 alert once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_level3_alert_fires_once_across_replicas() {
    let redis = RedisServer::start();
    let rules = TestRules::new();
    let dir = tempfile::tempdir().unwrap();
    let key = shared_subject_key(dir.path());
    let url = redis.url();
    let args = [
        "--redis-url",
        &url,
        "--redis-timeout",
        "2s",
        "--subject-key-file",
        key.to_str().unwrap(),
        "--escalation-level3-subjects",
        "5",
    ];
    let daemons: Vec<Process> = (0..3)
        .map(|_| Process::spawn(rules.path(), &args))
        .collect();
    let mut tasks = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let client = d.client().await;
        for n in 0..20 {
            let mut c = client.clone();
            // RULE-MIST-005: level 2 on the first hit.
            let r = subject_req(CSAM_PHRASE, &format!("subject-{i}-{n}"));
            tasks.push(tokio::spawn(async move { within(c.classify(r)).await }));
        }
    }
    let mut level3 = 0;
    for t in tasks {
        let r = t.await.unwrap().unwrap().into_inner();
        level3 += usize::from(r.escalation_level == 3);
    }
    assert_eq!(level3, 1, "one decision carries the alert");
    let mut alerts = 0.0;
    for d in &daemons {
        alerts += scrape_value(d, "mistguard_escalation_alerts_total", &[]).await;
    }
    assert_eq!(alerts, 1.0);
}

/// Redis dies in the middle of a load and comes back: no request fails because of it, the
/// degraded metric goes up and back down, and a suspension made during the outage holds
/// afterwards, on this replica and (merged back) on one that starts later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_fails_no_request_and_merges_back() {
    let mut redis = RedisServer::start();
    let rules = TestRules::new();
    let dir = tempfile::tempdir().unwrap();
    let key = shared_subject_key(dir.path());
    let url = redis.url();
    let args = [
        "--redis-url",
        &url,
        "--subject-key-file",
        key.to_str().unwrap(),
    ];
    let d = Process::spawn(rules.path(), &args);
    let client = d.client().await;
    // A steady load from several subjects while Redis goes away and comes back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4 {
        let mut c = client.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = if n.is_multiple_of(5) {
                    "I think zorblax must be destroyed."
                } else {
                    "hello"
                };
                let r =
                    within(c.classify(subject_req(text, &format!("load-{w}-{}", n % 50)))).await;
                r.expect("no request fails because Redis is down");
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(scrape_value(&d, "mistguard_state_degraded", &[]).await, 0.0);
    redis.stop();
    // Degraded within a few calls.
    let deadline = Instant::now() + STEP;
    while scrape_value(&d, "mistguard_state_degraded", &[]).await != 1.0 {
        assert!(Instant::now() < deadline, "{}", d.stderr_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // During the outage: three blocks suspend a subject locally.
    let mut c = client.clone();
    let blocked = format!("I think {BLOCK_PHRASE}.");
    for _ in 0..3 {
        within(c.classify(subject_req(&blocked, "user-outage")))
            .await
            .unwrap();
    }
    let r = within(c.classify(subject_req("hello", "user-outage")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reason, "suspended");
    redis.restart();
    let deadline = Instant::now() + STEP;
    while scrape_value(&d, "mistguard_state_degraded", &[]).await != 0.0 {
        assert!(Instant::now() < deadline, "{}", d.stderr_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        assert!(l.await.unwrap() > 0);
    }
    // The suspension holds here, and Redis (empty after its restart) got it back: a replica
    // started now sees it.
    let r = within(c.classify(subject_req("hello", "user-outage")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reason, "suspended");
    let other = Process::spawn(rules.path(), &args);
    let mut c2 = other.client().await;
    let r = within(c2.classify(subject_req("hello", "user-outage")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reason, "suspended", "merged back into Redis");
    let log = d.stderr_text();
    assert!(log.contains("shared state degraded"), "{log}");
    assert!(log.contains("shared state recovered"), "{log}");
}

/// Without Redis, a data directory keeps suspensions and the review queue across a restart;
/// the Admin service lifts one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspensions_survive_a_restart_and_are_lifted() {
    let rules = TestRules::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let tokens = admin_tokens(dir.path());
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--admin-tokens-file",
        tokens.to_str().unwrap(),
    ];
    {
        let mut p = Process::spawn(rules.path(), &args);
        let mut c = p.client().await;
        within(c.classify(subject_req(CSAM_PHRASE, "user-restart")))
            .await
            .unwrap();
        p.signal(libc::SIGTERM);
        let _ = tokio::task::spawn_blocking(move || p.wait_exit(STEP)).await;
    }
    let p = Process::spawn(rules.path(), &args);
    let mut c = p.client().await;
    let r = within(c.classify(subject_req("hello", "user-restart")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reason, "suspended", "the suspension survived the restart");
    let mut a = admin_client(p.addr).await;
    let list = within(a.list_reviews(admin(pb::ListReviewsRequest { limit: 0 })))
        .await
        .unwrap()
        .into_inner()
        .reviews;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].rules[0].rule_id, "RULE-MIST-005");
    // A wrong token is refused; a malformed hash is INVALID_ARGUMENT; unknown is NOT_FOUND.
    let mut bad = Request::new(pb::ListReviewsRequest { limit: 0 });
    bad.metadata_mut().insert(
        "authorization",
        "Bearer nope-nope-nope-nope".parse().unwrap(),
    );
    assert_eq!(
        a.list_reviews(bad).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let e = a
        .lift_suspension(admin(pb::LiftSuspensionRequest {
            subject_hash: "user-restart".into(),
            note: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = a
        .lift_suspension(admin(pb::LiftSuspensionRequest {
            subject_hash: "0".repeat(32),
            note: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // Lift it with the CLI, as an operator would.
    let out = std::process::Command::new(binary())
        .args(["reviews", "--addr", &format!("http://{}", p.addr), "lift"])
        .arg(&list[0].subject_hash)
        .env("MISTGUARD_ADMIN_TOKEN", "admin-token-0123456789abcdef")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = within(c.classify(subject_req("hello", "user-restart")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32);
    drop(p);
    // And the lift is durable too.
    let p = Process::spawn(rules.path(), &args);
    let mut c = p.client().await;
    let r = within(c.classify(subject_req("hello", "user-restart")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32);
}

/// Per-subject limits: a request rate and a byte budget, local and shared through Redis, with a
/// retry-after in the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_budgets_answer_rate_limit_with_a_retry_after() {
    let rules = TestRules::new();
    let p = Process::spawn(
        rules.path(),
        &[
            "--limits-input-requests",
            "3/1m",
            "--limits-output-bytes",
            "100/1h",
        ],
    );
    let mut c = p.client().await;
    for _ in 0..3 {
        let r = within(c.classify(subject_req("hello", "user-rate")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.action, pb::Action::Allow as i32);
    }
    let r = within(c.classify(subject_req("hello", "user-rate")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::RateLimit as i32);
    assert_eq!(r.reason, "rate_limited");
    assert!(
        r.retry_after_ms > 1000 && r.retry_after_ms <= 60_000,
        "{r:?}"
    );
    // Another subject, and calls without a subject, are not limited.
    let r = within(c.classify(subject_req("hello", "user-other")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32);
    // The output byte budget: 60 + 60 bytes of completions go over 100.
    let out = |s: &str| pb::ClassifyRequest {
        text: "x".repeat(60),
        subject: s.into(),
        direction: pb::Direction::Output as i32,
        ..Default::default()
    };
    let r = within(c.classify(out("user-bytes")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32);
    let r = within(c.classify(out("user-bytes")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::RateLimit as i32);
    assert!(r.retry_after_ms > 0);
    let m = scrape(p.metrics_addr).await;
    assert_eq!(
        metric_value(&m, "mistguard_limited_total", &["reason=\"rate_limited\""]),
        2.0
    );

    // Shared through Redis: two replicas, one quota.
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = shared_subject_key(dir.path());
    let url = redis.url();
    let args = [
        "--redis-url",
        &url,
        "--subject-key-file",
        key.to_str().unwrap(),
        "--limits-input-requests",
        "3/1m",
    ];
    let a = Process::spawn(rules.path(), &args);
    let b = Process::spawn(rules.path(), &args);
    let (ca, mut cb) = (a.client().await, b.client().await);
    for mut c in [ca.clone(), ca.clone(), cb.clone()] {
        let r = within(c.classify(subject_req("hello", "user-shared")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.action, pb::Action::Allow as i32);
    }
    let r = within(cb.classify(subject_req("hello", "user-shared")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.action,
        pb::Action::RateLimit as i32,
        "the quota is shared"
    );
    assert_eq!(r.reason, "rate_limited");
}

/// An unreachable Redis at start-up: one line, and a start or a stop as `redis.required` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_at_start_is_one_line_and_a_setting() {
    let rules = TestRules::new();
    let dir = tempfile::tempdir().unwrap();
    let key = shared_subject_key(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let out = std::process::Command::new(binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ])
        .arg("--rulesets")
        .arg(rules.path())
        .args([
            "--redis-url",
            &url,
            "--redis-required",
            "true",
            "--subject-key-file",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("redis")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("redis.required"), "{err}");
    // Not required: it starts degraded and serves from local state.
    let p = Process::spawn(
        rules.path(),
        &[
            "--redis-url",
            &url,
            "--subject-key-file",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(scrape_value(&p, "mistguard_state_degraded", &[]).await, 1.0);
    let mut c = p.client().await;
    let r = within(c.classify(subject_req("hello", "user-x")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32);
    // With `limits.when_redis_down = closed`, limits that cannot be checked refuse the call.
    let closed = Process::spawn(
        rules.path(),
        &[
            "--redis-url",
            &url,
            "--subject-key-file",
            key.to_str().unwrap(),
            "--limits-input-requests",
            "100/1m",
            "--limits-when-redis-down",
            "closed",
        ],
    );
    let mut c = closed.client().await;
    let r = within(c.classify(subject_req("hello", "user-x")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::RateLimit as i32);
    assert_eq!(r.reason, "limits_unavailable");
    assert!(r.retry_after_ms > 0);
    // Calls without a subject have no per-subject limits.
    let r = within(c.classify(subject_req("hello", "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32);
    // Redis without a shared subject key is a configuration error (exit 64).
    let out = std::process::Command::new(binary())
        .args(["serve", "--check-config", "--redis-url", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("subject_key_file"));
}
