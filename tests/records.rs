//! Decision records on disk (issue 18), against the real binary: a kill -9 in the middle of a
//! load loses no answered decision and leaves a chain that verifies; records hold no text, key
//! or raw subject; RULE-MIST-005 goes to the report sink and RULE-MIST-007 samples only where the
//! operator opted in; `mistguard records query` finds a subject's records.

mod support;

use mistguard::daemon::pb;
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

fn verify(dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(binary())
        .arg("records")
        .arg("verify")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `sync` records, several clients, SIGKILL mid-load: every decision id a client received is in
/// the records, the chain verifies up to the torn tail, and a restart recovers the tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loses_no_answered_decision() {
    let rules = TestRules::new();
    let dir = tempfile::tempdir().unwrap();
    let recs = dir.path().join("records");
    let args = [
        "--records-dir",
        recs.to_str().unwrap(),
        "--records-durability",
        "sync",
    ];
    let mut p = Process::spawn(rules.path(), &args);
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let client = p.client().await;
    let mut load = Vec::new();
    for w in 0..8 {
        let mut c = client.clone();
        let received = received.clone();
        load.push(tokio::spawn(async move {
            for n in 0u64.. {
                let text = if n.is_multiple_of(3) {
                    format!("note {n}: I think {BLOCK_PHRASE}.")
                } else {
                    format!("hello number {n} from worker {w}")
                };
                match c.classify(subject_req(&text, &format!("kill-{w}"))).await {
                    Ok(r) => received.lock().unwrap().push(r.into_inner().decision_id),
                    Err(_) => return, // the daemon is gone
                }
            }
        }));
    }
    // Kill once a good number of decisions were answered.
    let deadline = std::time::Instant::now() + STEP;
    while received.lock().unwrap().len() < 400 {
        assert!(std::time::Instant::now() < deadline, "{}", p.stderr_text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.signal(libc::SIGKILL);
    for l in load {
        let _ = within(l).await;
    }
    let _ = p.wait_exit(STEP);
    let got: Vec<String> = received.lock().unwrap().clone();
    let on_disk: HashSet<String> = record_lines(&recs, "decisions")
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = got.iter().filter(|id| !on_disk.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered decisions are not in the records",
        missing.len(),
        got.len()
    );
    let (code, out) = verify(&recs);
    assert_eq!(code, Some(0), "{out}");
    // A restart cuts a torn tail off and the chain goes on.
    let p = Process::spawn(rules.path(), &args);
    let mut c = p.client().await;
    let r = within(c.classify(subject_req("after the restart", "kill-after")))
        .await
        .unwrap()
        .into_inner();
    let after = record_lines(&recs, "decisions");
    assert_eq!(after.last().unwrap()["id"], r.decision_id.as_str());
    let (code, out) = verify(&recs);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("torn"), "{out}");
    // Tampering is found and named.
    drop(p);
    let seg = std::fs::read_dir(&recs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("decisions-"))
        .unwrap();
    let text = std::fs::read_to_string(&seg).unwrap();
    let tampered = text.replacen("\"action\":\"block\"", "\"action\":\"allow\"", 1);
    assert_ne!(text, tampered);
    std::fs::write(&seg, tampered).unwrap();
    let (code, out) = verify(&recs);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("broken"), "{out}");
}

/// Canary strings in texts, subjects, a protected text, tool arguments and the subject key: no
/// record file holds any of them. RULE-MIST-005 also goes to the report sink; RULE-MIST-007
/// samples (with their text) go to their own file, only with `records.samples = on`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_hold_no_text_key_or_subject() {
    const TEXT: &str = "canarytextqzx";
    const SUBJECT: &str = "canarysubjectqzx";
    const KEY: &str = "canarykeyqzx-0123456789abcdef0123456789";
    const SAMPLE: &str = "the moon landing was staged canarysampleqzx";
    let rules = TestRules::new();
    rules.add_trigger(
        "mist-007.toml",
        "RULE-MIST-007",
        "daemon.test.misinfo",
        "moon landing was staged",
    );
    let dir = tempfile::tempdir().unwrap();
    let recs = dir.path().join("records");
    let key = dir.path().join("subject.key");
    std::fs::write(&key, KEY).unwrap();
    let p = Process::spawn(
        rules.path(),
        &[
            "--records-dir",
            recs.to_str().unwrap(),
            "--subject-key-file",
            key.to_str().unwrap(),
            "--records-samples",
            "on",
        ],
    );
    let mut c = p.client().await;
    let mut ids = Vec::new();
    for text in [
        format!("{TEXT} hello"),
        format!("{TEXT} I think {BLOCK_PHRASE}."),
        format!("{TEXT} {CSAM_PHRASE}"),
        format!("{TEXT} {INJECTION_PHRASE}"),
    ] {
        let r = within(c.classify(subject_req(&text, SUBJECT)))
            .await
            .unwrap()
            .into_inner();
        ids.push(r.decision_id);
    }
    let r = within(c.classify(subject_req(SAMPLE, "someone-else")))
        .await
        .unwrap()
        .into_inner();
    let sample_id = r.decision_id.clone();
    ids.push(r.decision_id);
    // A stream and a tool call.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut s = within(c.classify_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    for chunk in [format!("{TEXT} part one "), format!("{TEXT} part two")] {
        tx.send(pb::ClassifyStreamRequest {
            text: chunk,
            subject: SUBJECT.into(),
            direction: pb::Direction::Output as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    drop(tx);
    let mut stream_id = String::new();
    while let Some(m) = within(s.message()).await.unwrap() {
        stream_id = m.decision_id;
    }
    ids.push(stream_id);
    let t = within(c.authorize_tool_call(pb::AuthorizeToolCallRequest {
        tool: "run_query".into(),
        arguments_json: format!("{{\"sql\":\"select '{TEXT}'\"}}"),
        subject: SUBJECT.into(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    ids.push(t.decision_id);
    drop(p);

    let decisions = record_lines(&recs, "decisions");
    let on_disk: HashSet<&str> = decisions
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    for id in &ids {
        assert!(on_disk.contains(id.as_str()), "{id} missing");
    }
    let rpcs: HashSet<&str> = decisions
        .iter()
        .map(|r| r["rpc"].as_str().unwrap())
        .collect();
    assert_eq!(rpcs.len(), 3, "{rpcs:?}");
    // Every record file, byte for byte: no canary but the opted-in sample's text.
    for entry in std::fs::read_dir(&recs).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for canary in [TEXT, SUBJECT, KEY, &KEY[..20]] {
            assert!(!text.contains(canary), "{} holds {canary}", path.display());
        }
        let is_samples = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("samples-");
        assert_eq!(
            text.contains("canarysampleqzx"),
            is_samples,
            "{}",
            path.display()
        );
    }
    // The report sink holds the RULE-MIST-005 decision, and only it.
    let reports = record_lines(&recs, "reports");
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["id"], ids[2].as_str());
    let samples = record_lines(&recs, "samples");
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0]["decision_id"], sample_id.as_str());
    // A record carries the hits (rule, trigger, span), the text's length and keyed hash.
    let blocked = decisions
        .iter()
        .find(|r| r["id"] == ids[1].as_str())
        .unwrap();
    assert_eq!(blocked["hits"][0]["rule"], "RULE-MIST-001");
    assert_eq!(blocked["hits"][0]["trigger"], "daemon.test.harm");
    assert!(blocked["hits"][0]["end"].as_u64().unwrap() > 0);
    assert_eq!(
        blocked["text_bytes"],
        format!("{TEXT} I think {BLOCK_PHRASE}.").len()
    );
    assert_eq!(blocked["text_hash"].as_str().unwrap().len(), 64);
    assert_eq!(blocked["subject_hash"].as_str().unwrap().len(), 32);

    // `records query` by subject (given in clear, hashed with the key) and rule, as CSV.
    let out = Command::new(binary())
        .arg("records")
        .arg("query")
        .arg(&recs)
        .args(["--subject", SUBJECT, "--subject-key-file"])
        .arg(&key)
        .args(["--rule", "RULE-MIST-001", "--format", "csv"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[1].starts_with(&ids[1]), "{csv}");
    assert!(!csv.contains(SUBJECT));
}
