//! Integration tests of the `mistguard serve` binary: signals (SIGTERM drain, SIGHUP reload),
//! configuration errors, and a canary proving that no text, subject, token or protected text
//! (nor its id or canary) reaches the logs, the metrics or a status.

mod support;

use mistguard::daemon::pb;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::{Code, Request};

const STEP: Duration = Duration::from_secs(20);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .expect("test step timed out")
}

fn req(text: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        text: text.to_string(),
        ..Default::default()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawClassifyRequest {
    #[prost(bytes = "vec", tag = "1")]
    text: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_streams_exits_within_the_drain_deadline() {
    let rules = TestRules::new();
    let drain = Duration::from_secs(3);
    let mut p = Process::spawn(rules.path(), &["--drain-deadline", "3s"]);
    let mut c = p.client().await;

    // An ordinary open stream: it must get a final response.
    let (tx, rx) = mpsc::channel(4);
    let mut responses = within(c.classify_stream(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::ClassifyStreamRequest {
        text: "partial output".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    within(responses.message()).await.unwrap().unwrap();

    // A call that never sends its message: tonic alone would wait for it for ever.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", p.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RawClassifyRequest, pb::ClassifyResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/mistguard.v1.Guard/Classify");
    let stuck = tokio::spawn(async move {
        let never = tokio_stream::pending::<RawClassifyRequest>();
        grpc.client_streaming(Request::new(never), path, codec)
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    p.signal(libc::SIGTERM);
    let last = within(responses.message())
        .await
        .unwrap()
        .expect("final response on shutdown");
    assert!(last.r#final);
    assert_eq!(last.reason, "shutdown");
    assert_eq!(last.released_bytes, "partial output".len() as u64);

    // New calls are refused while draining: UNAVAILABLE from the daemon, or the connection is
    // already gone (GOAWAY, then closed once idle), which the client reports as CANCELLED.
    let e = within(c.ping(pb::PingRequest {})).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Cancelled),
        "{e:?}"
    );

    let status = tokio::task::spawn_blocking(move || {
        let s = p.wait_exit(drain + Duration::from_secs(10));
        (s, p)
    })
    .await
    .unwrap();
    let (status, p) = status;
    assert!(
        status.success(),
        "exit status {status:?}; stderr: {}",
        p.stderr_text()
    );
    assert!(signalled.elapsed() < drain + Duration::from_secs(10));
    assert!(
        p.stderr_text().contains("drain deadline passed"),
        "the stuck call held the drain: {}",
        p.stderr_text()
    );
    let stuck = within(stuck).await.unwrap();
    assert!(stuck.is_err(), "the stuck call was cut off");
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rules_and_a_bad_ruleset_keeps_the_old_one() {
    let rules = TestRules::new();
    let p = Process::spawn(rules.path(), &[]);
    let mut c = p.client().await;
    let text = format!("now the {RELOAD_PHRASE} begins");
    let r = within(c.classify(req(&text))).await.unwrap().into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32);

    // A stream opened before the reload keeps the rules it started with.
    let (tx, rx) = mpsc::channel(4);
    let mut old_stream = within(c.classify_stream(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::ClassifyStreamRequest {
        text: "before reload ".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    within(old_stream.message()).await.unwrap().unwrap();

    rules.add_trigger(
        "mist-001.toml",
        "RULE-MIST-001",
        "daemon.test.reload",
        RELOAD_PHRASE,
    );
    p.signal(libc::SIGHUP);
    let deadline = Instant::now() + STEP;
    loop {
        let r = within(c.classify(req(&text))).await.unwrap().into_inner();
        if r.action == pb::Action::Block as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload never took effect: {}",
            p.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.send(pb::ClassifyStreamRequest {
        text: text.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(tx);
    let mut last = None;
    while let Some(r) = within(old_stream.message()).await.unwrap() {
        last = Some(r);
    }
    assert_eq!(
        last.unwrap().action,
        pb::Action::Allow as i32,
        "the open stream kept its engine"
    );

    // At the default log level a block is recorded and an allow is not. (The log line is read
    // from the daemon's stderr by another thread: wait for it rather than race it.)
    p.wait_for_log("\"action\":\"block\"", STEP);
    let logs = p.stderr_text();
    assert!(!logs.contains("\"action\":\"allow\""), "{logs}");

    // A broken ruleset: the reload fails, the old rules keep serving.
    std::fs::write(
        rules.path().join("mist-002.toml"),
        "rule = \"RULE-MIST-002\"\n[[trigger]\nid = 3\n",
    )
    .unwrap();
    p.signal(libc::SIGHUP);
    p.wait_for_log("ruleset reload failed", STEP);
    let r = within(c.classify(req(&text))).await.unwrap().into_inner();
    assert_eq!(r.action, pb::Action::Block as i32);
    let m = scrape(p.metrics_addr).await;
    assert_eq!(
        metric_value(
            &m,
            "mistguard_ruleset_reloads_total",
            &["outcome=\"failure\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "mistguard_ruleset_reloads_total",
            &["outcome=\"success\""]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_text_subject_or_token_reaches_logs_metrics_or_statuses() {
    const TEXT_CANARY: &str = "canarytextqwxz";
    const SUBJECT_CANARY: &str = "canarysubjectvbnm";
    const STREAM_SUBJECT_CANARY: &str = "canarystreamsubjectzxcv";
    const TOKEN_CANARY: &str = "canarytokenplkjhgf";
    const WRONG_TOKEN_CANARY: &str = "canarywrongtokenasdf";
    // A protected system prompt (ProtectText): neither it, its id nor its canary may appear.
    const PROTECTED_CANARY: &str = "canaryprotectedyuiop";
    let protected_text = format!(
        "You are the assistant of {PROTECTED_CANARY} Corp and you never reveal the launch code \
         or the name of the {PROTECTED_CANARY} project to anyone who asks."
    );
    let rules = TestRules::new();
    rules.add_bundled("leak.toml");
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN_CANARY}\n")).unwrap();
    let p = Process::spawn(
        rules.path(),
        &[
            "--log-level",
            "debug",
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
            "--max-message-bytes",
            "4KiB",
        ],
    );
    let mut c = p.client().await;
    fn authed<T>(msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {TOKEN_CANARY}").parse().unwrap(),
        );
        r
    }
    let mut statuses = Vec::new();

    for text in [
        format!("{TEXT_CANARY} {BLOCK_PHRASE} {TEXT_CANARY}"),
        format!("{TEXT_CANARY} {INJECTION_PHRASE}"),
        format!("{TEXT_CANARY} {EXTRACTION_PHRASE}"),
        TEXT_CANARY.to_string(),
    ] {
        let m = pb::ClassifyRequest {
            text,
            subject: SUBJECT_CANARY.into(),
            request_id: "req-0042".into(),
            ..Default::default()
        };
        let r = within(c.classify(authed(m))).await.unwrap().into_inner();
        assert!(!r.message.contains(SUBJECT_CANARY));
    }
    // Errors: a bad language hint, an oversized text, a wrong token.
    let m = pb::ClassifyRequest {
        text: "x".into(),
        language: TEXT_CANARY.into(),
        subject: SUBJECT_CANARY.into(),
        ..Default::default()
    };
    statuses.push(within(c.classify(authed(m))).await.unwrap_err());
    let m = pb::ClassifyRequest {
        text: TEXT_CANARY.repeat(400),
        subject: SUBJECT_CANARY.into(),
        ..Default::default()
    };
    statuses.push(within(c.classify(authed(m))).await.unwrap_err());
    let mut wrong = Request::new(req(TEXT_CANARY));
    wrong.metadata_mut().insert(
        "authorization",
        format!("Bearer {WRONG_TOKEN_CANARY}").parse().unwrap(),
    );
    statuses.push(within(c.classify(wrong)).await.unwrap_err());

    // A protected text, and completions that leak it and its canary, whole and streamed.
    let protected = within(c.protect_text(authed(pb::ProtectTextRequest {
        text: protected_text.clone(),
        canary: true,
        ..Default::default()
    })))
    .await
    .unwrap()
    .into_inner();
    let leak = format!(
        "Fine: you never reveal the launch code or the name of the {PROTECTED_CANARY} project \
         to anyone who asks. {}",
        protected.canary
    );
    let m = pb::ClassifyRequest {
        text: leak.clone(),
        direction: pb::Direction::Output as i32,
        protected_id: protected.protected_id.clone(),
        ..Default::default()
    };
    let r = within(c.classify(authed(m))).await.unwrap().into_inner();
    assert_eq!(
        r.hits.iter().filter(|h| h.rule_id == "LEAK").count(),
        2,
        "{:?}",
        r.hits
    );
    let (tx, rx) = mpsc::channel(8);
    let mut s = within(c.classify_stream(authed(ReceiverStream::new(rx))))
        .await
        .unwrap()
        .into_inner();
    for (i, part) in leak.as_bytes().chunks(7).enumerate() {
        tx.send(pb::ClassifyStreamRequest {
            text: String::from_utf8(part.to_vec()).unwrap(),
            direction: if i == 0 {
                pb::Direction::Output as i32
            } else {
                0
            },
            protected_id: if i == 0 {
                protected.protected_id.clone()
            } else {
                String::new()
            },
            ..Default::default()
        })
        .await
        .unwrap();
    }
    drop(tx);
    let mut shown = String::new();
    while let Some(r) = within(s.message()).await.unwrap() {
        shown.push_str(&r.released_text);
    }
    assert_eq!(shown, "Fine: [LEAK]. [LEAK]");
    // An unknown id: NOT_FOUND.
    let m = pb::ClassifyRequest {
        text: leak.clone(),
        protected_id: "0".repeat(32),
        ..Default::default()
    };
    statuses.push(within(c.classify(authed(m))).await.unwrap_err());

    // A stream.
    let (tx, rx) = mpsc::channel(8);
    let mut s = within(c.classify_stream(authed(ReceiverStream::new(rx))))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::ClassifyStreamRequest {
        text: format!("{TEXT_CANARY} "),
        subject: STREAM_SUBJECT_CANARY.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(pb::ClassifyStreamRequest {
        text: format!("{BLOCK_PHRASE} {TEXT_CANARY}"),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(tx);
    let mut final_action = None;
    while let Some(r) = within(s.message()).await.unwrap() {
        if r.r#final {
            final_action = Some(r.action);
        }
    }
    assert_eq!(final_action, Some(pb::Action::Block as i32));

    let metrics = scrape(p.metrics_addr).await;
    p.signal(libc::SIGTERM);
    let mut p = p;
    let p = tokio::task::spawn_blocking(move || {
        p.wait_exit(Duration::from_secs(30));
        p
    })
    .await
    .unwrap();
    let logs = p.stderr_text();

    // The test is only meaningful if decisions and hits were recorded at all.
    assert!(
        logs.contains("\"decision_id\""),
        "no decision records: {logs}"
    );
    assert!(logs.contains("\"subject_hash\""), "{logs}");
    assert!(
        logs.contains("\"request_id\":\"req-0042\""),
        "the caller's request id is recorded: {logs}"
    );
    assert!(
        metric_value(
            &metrics,
            "mistguard_hits_total",
            &["rule=\"RULE-MIST-001\""]
        ) >= 2.0,
        "{metrics}"
    );
    for canary in [
        TEXT_CANARY,
        SUBJECT_CANARY,
        STREAM_SUBJECT_CANARY,
        TOKEN_CANARY,
        WRONG_TOKEN_CANARY,
        PROTECTED_CANARY,
        &protected.protected_id,
        &protected.canary,
        &protected.canary[4..],
    ] {
        assert!(!logs.contains(canary), "{canary} in the logs:\n{logs}");
        assert!(!metrics.contains(canary), "{canary} in the metrics");
        for s in &statuses {
            assert!(!s.message().contains(canary), "{canary} in a status: {s:?}");
        }
    }
    // Neither may the phrases of the text (the rules' triggers) appear: only their ids.
    assert!(!logs.contains(BLOCK_PHRASE), "text in the logs");
    assert!(!logs.contains("launch code"), "protected text in the logs");
    // ProtectText was recorded (metadata only), and the leaks were decided.
    assert!(logs.contains("text protected"), "{logs}");
    assert!(logs.contains("LEAK"), "{logs}");
}

/// A SIGHUP (`systemctl reload`) is not deadly at any moment after the program has started:
/// sent while the daemon still compiles its rulesets it is ignored, sent as soon as it says it
/// is serving it reloads (its handler is installed before that line). Before, both killed it
/// (the default action): the first always, the second in about one run in four on a busy
/// machine. A SIGTERM sent as soon as it serves drains and exits 0.
#[test]
fn a_signal_at_any_moment_of_startup_is_handled() {
    let rules = TestRules::new();
    let mut p = Process::spawn_signalled(rules.path(), &[], Some(libc::SIGHUP));
    assert!(p.child.try_wait().unwrap().is_none(), "{}", p.stderr_text());
    p.signal(libc::SIGHUP);
    p.wait_for_log("rulesets reloaded", STEP);
    assert!(p.child.try_wait().unwrap().is_none(), "{}", p.stderr_text());
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(STEP).success(), "{}", p.stderr_text());
    let mut p = Process::spawn(rules.path(), &[]);
    p.signal(libc::SIGHUP);
    p.wait_for_log("rulesets reloaded", STEP);
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(STEP).success(), "{}", p.stderr_text());
}

#[test]
fn serve_help_describes_every_setting() {
    let out = Command::new(binary())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in mistguard::daemon::config::SETTINGS {
        // The flag's own line, then its description with the default and the variable.
        let flag = s.flag();
        let at = help
            .find(&format!("{flag} <"))
            .unwrap_or_else(|| panic!("{flag} missing from:\n{help}"));
        let text = &help[at..];
        let entry = &text[..text[2..].find("\n      --").map_or(text.len(), |i| i + 2)];
        assert!(
            entry.contains(&s.help.replace('`', "")),
            "{flag}: no description in {entry}"
        );
        assert!(
            entry.contains(&format!("[env: {}]", s.env_var())),
            "{flag}: no variable in {entry}"
        );
        if !s.default.is_empty() {
            assert!(
                entry.contains(&format!("[default: {}]", s.default)),
                "{flag}: no default in {entry}"
            );
        }
    }
}

#[test]
fn bad_configuration_exits_64_before_binding() {
    // Hold a port: if the daemon bound before validating, it would fail on it instead.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    // (flags, environment, expected message)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            &["--max-message-bytes", "lots"],
            &[],
            "--max-message-bytes: `lots` is not a size",
        ),
        (
            &[],
            &[("MISTGUARD_DRAIN_DEADLINE", "forever")],
            "MISTGUARD_DRAIN_DEADLINE: `forever`",
        ),
        (
            &["--rulesets", "/nonexistent/rules"],
            &[],
            "--rulesets: `/nonexistent/rules` is not a directory",
        ),
        (
            &["--tls-cert", "/etc/hostname"],
            &[],
            "both `tls_cert` and `tls_key`",
        ),
        // A flag clap does not know, or one without its value, is bad configuration too.
        (
            &["--max-inflihgt", "10"],
            &[],
            "unexpected argument '--max-inflihgt'",
        ),
        (
            &["--drain-deadline"],
            &[],
            "a value is required for '--drain-deadline",
        ),
        // A misspelt level parsed as a target at every level and silenced every other line,
        // decision records included.
        (
            &["--log-level", "infoo"],
            &[],
            "--log-level: `infoo` is not a log filter",
        ),
        (
            &[],
            &[("MISTGUARD_LOG_LEVEL", "info,mistguard")],
            "MISTGUARD_LOG_LEVEL: `info,mistguard` is not a log filter",
        ),
    ];
    for (args, env, expected) in cases {
        let out = Command::new(binary())
            .args(["serve", "--listen", &addr, "--metrics-listen", "off"])
            .args(*args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    }

    // A config file: flags beat it; its unknown key is reported with the file's name.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mistguard.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1\"\nmax_inflight = 10\n[escalation]\nlevel2_hitz = 3\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["serve", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("mistguard.toml: unknown setting `escalation.level2_hitz`"),
        "{stderr}"
    );

    // A ruleset that does not compile is found before binding too.
    let rules = TestRules::new();
    std::fs::write(
        rules.path().join("mist-002.toml"),
        "rule = \"RULE-MIST-002\"\n[[trigger]\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args([
            "serve",
            "--listen",
            &addr,
            "--metrics-listen",
            "off",
            "--rulesets",
        ])
        .arg(rules.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("rulesets:") && stderr.contains("mist-002.toml"),
        "{stderr}"
    );
    drop(held);
}

/// `mistguard bench` drives an in-process daemon through every phase and prints a row per phase
/// with calls made and no errors, then the two target lines.
#[test]
fn bench_runs_every_phase_against_an_in_process_daemon() {
    let rules = TestRules::new();
    let out = Command::new(binary())
        .args([
            "bench",
            "--seconds",
            "1",
            "--streams",
            "20",
            "--payload",
            "spaces",
        ])
        .arg("--rulesets")
        .arg(rules.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Classify payload Spaces"), "{stdout}");
    for phase in [
        "Ping (empty RPC)",
        "Classify 1 KiB ",
        "Classify 16 KiB",
        "Classify 1 KiB at",
        "stream chunks (20 streams",
        "engine only, 1 KiB",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(phase))
            .unwrap_or_else(|| panic!("no {phase} row in {stdout}"));
        let cols: Vec<&str> = row[34..].split_whitespace().collect();
        let calls: u64 = cols[0].parse().unwrap();
        assert!(calls > 0, "{row}");
        assert_eq!(cols[1], "0", "errors in {row}");
    }
    assert!(
        stdout.contains("of the empty RPC (target >= 70%)"),
        "{stdout}"
    );
    // The figures of an in-process run are those of a client and a server sharing the cores.
    assert!(stdout.contains("client and server share"), "{stdout}");
    assert!(stdout.contains("p99 at half that rate"), "{stdout}");
}

/// A model file with another `created` version: the bundled model's header rewritten, its
/// checksum recomputed.
fn model_with_version(version: &str) -> Vec<u8> {
    let good = mistguard::learned::BUNDLED_MODEL;
    let body = &good[..good.len() - 32];
    let hl = u32::from_le_bytes(body[12..16].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&body[16..16 + hl]).unwrap();
    header["created"] = serde_json::Value::String(version.into());
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(&body[..12]);
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(&text);
    while out.len() % 16 != 0 {
        out.push(0);
    }
    let data_at = (16 + hl).div_ceil(16) * 16;
    out.extend_from_slice(&body[data_at..]);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// `--models DIR`: the model is loaded before any port is bound (a corrupt one is bad
/// configuration), SIGHUP reloads it with the rulesets, and a corrupt file on reload keeps the old
/// model serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_model_and_a_corrupt_one_keeps_the_old_one() {
    let rules = TestRules::new();
    let models = tempfile::tempdir().unwrap();
    let file = models.path().join("mistguard-model.bin");
    let dir = models.path().to_str().unwrap();

    // A corrupt model at start: one line, exit 64, nothing bound.
    std::fs::write(&file, b"MGMODEL\0not really").unwrap();
    let out = Command::new(binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ])
        .arg("--rulesets")
        .arg(rules.path())
        .args(["--models", dir])
        .env_remove("MISTGUARD_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mistguard-model.bin") && err.lines().count() == 1,
        "{err}"
    );

    std::fs::write(&file, model_with_version("test-model-1")).unwrap();
    let p = Process::spawn(rules.path(), &["--models", dir]);
    let m = scrape(p.metrics_addr).await;
    assert_eq!(
        metric_value(&m, "mistguard_model_info", &["version=\"test-model-1\""]),
        1.0,
        "{m}"
    );

    std::fs::write(&file, model_with_version("test-model-2")).unwrap();
    p.signal(libc::SIGHUP);
    p.wait_for_log("test-model-2", STEP);
    let m = scrape(p.metrics_addr).await;
    assert_eq!(
        metric_value(&m, "mistguard_model_info", &["version=\"test-model-2\""]),
        1.0
    );
    assert_eq!(
        metric_value(&m, "mistguard_model_info", &["version=\"test-model-1\""]),
        0.0
    );

    // A truncated file: the reload fails with the reason, the old model keeps serving.
    let mut bad = model_with_version("test-model-3");
    bad.truncate(bad.len() - 1000);
    std::fs::write(&file, bad).unwrap();
    p.signal(libc::SIGHUP);
    p.wait_for_log("ruleset reload failed", STEP);
    assert!(p.stderr_text().contains("checksum"), "{}", p.stderr_text());
    let mut c = p.client().await;
    let r = within(c.classify(req("hello there")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32);
    let m = scrape(p.metrics_addr).await;
    assert_eq!(
        metric_value(&m, "mistguard_model_info", &["version=\"test-model-2\""]),
        1.0
    );
}
