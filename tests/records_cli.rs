//! `mistguard records verify|query` on a directory written through the library.

use mistguard::daemon::ids::SubjectHasher;
use mistguard::io::records::{DecisionRecord, RecordHit, Sink, SinkConfig};
use std::path::Path;
use std::process::{Command, Output};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-test-key\n";

fn write_records(dir: &Path) {
    let hasher = SubjectHasher::from_secret(KEY.trim_ascii()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sink = Sink::open(
        dir,
        "decisions",
        SinkConfig {
            max_segment_bytes: 1500,
            ..SinkConfig::default()
        },
    )
    .unwrap();
    rt.block_on(async {
        for i in 0..20u64 {
            let subject = if i.is_multiple_of(2) { "alice" } else { "bob" };
            let rec = DecisionRecord {
                id: format!("{i:032x}"),
                time_unix_ms: 1_796_551_200_000 + i * 60_000,
                rpc: "classify".into(),
                direction: "input".into(),
                subject_hash: hasher.hash(subject).hex(),
                request_id: format!("req-{i}"),
                hits: if i.is_multiple_of(5) {
                    vec![RecordHit {
                        rule: "RULE-MIST-002".into(),
                        trigger: "x".into(),
                        score: 1.0,
                        start: 0,
                        end: 1,
                    }]
                } else {
                    vec![]
                },
                action: if i.is_multiple_of(5) {
                    "block"
                } else {
                    "allow"
                }
                .into(),
                reason: "a, \"quoted\" reason".into(),
                ..DecisionRecord::default()
            };
            sink.write(&rec).await.unwrap();
        }
    });
    sink.close();
}

fn mistguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mistguard"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn verify_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path());
    let d = dir.path().to_str().unwrap();
    let out = mistguard(&["records", "verify", d]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    assert!(
        line.starts_with("ok: ") && line.contains("20 records, chain intact"),
        "{line}"
    );

    let json = mistguard(&["records", "verify", d, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["records"], 20);

    // A missing directory, a wrong stream.
    let missing = dir.path().join("nope");
    assert_eq!(
        mistguard(&["records", "verify", missing.to_str().unwrap()])
            .status
            .code(),
        Some(64)
    );
    assert_eq!(
        mistguard(&["records", "verify", d, "--stream", "reports"])
            .status
            .code(),
        Some(64)
    );

    // Tamper with one byte of the second segment.
    let seg = dir.path().join("decisions-0000000002.jsonl");
    let body = std::fs::read_to_string(&seg).unwrap();
    std::fs::write(
        &seg,
        body.replacen("\"action\":\"allow\"", "\"action\":\"block\"", 1),
    )
    .unwrap();
    let out = mistguard(&["records", "verify", d]);
    assert_eq!(out.status.code(), Some(1));
    let line = text(&out.stdout);
    assert!(
        line.starts_with("broken: decisions-0000000002.jsonl line ")
            && line.contains("(id 000000000000000000000000000000")
            && line.contains("hash does not match"),
        "{line}"
    );
}

#[test]
fn torn_tail_still_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path());
    let mut segs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let last = segs.last().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    std::io::Write::write_all(&mut f, b"{\"hash\":\"0123").unwrap();
    let out = mistguard(&["records", "verify", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("torn"), "{}", text(&out.stdout));
}

#[test]
fn query_filters_and_formats() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path());
    let d = dir.path().to_str().unwrap();

    let out = mistguard(&["records", "query", d, "--action", "block"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    assert!(rows
        .iter()
        .all(|r| r["action"] == "block" && r.get("hash").is_none()));

    let out = mistguard(&[
        "records",
        "query",
        d,
        "--since",
        "2026-12-06T10:05:00Z",
        "--until",
        "2026-12-06T10:10:00Z",
        "--format",
        "csv",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let csv = text(&out.stdout);
    let mut lines = csv.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("id,time,rpc,direction,subject_hash,"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 5, "{csv}");
    assert!(
        rows[0].contains(",2026-12-06T10:05:00.000Z,classify,input,"),
        "{}",
        rows[0]
    );
    assert!(
        rows[0].contains(",RULE-MIST-002,x,block,0,\"a, \"\"quoted\"\" reason\","),
        "{}",
        rows[0]
    );

    let key = dir.path().join("subject.key");
    std::fs::write(&key, KEY).unwrap();
    let out = mistguard(&[
        "records",
        "query",
        d,
        "--subject",
        "alice",
        "--subject-key-file",
        key.to_str().unwrap(),
        "--rule",
        "RULE-MIST-002",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // alice is every even record; RULE-MIST-002 every fifth: 0 and 10.
    assert_eq!(text(&out.stdout).lines().count(), 2);
    assert!(!text(&out.stdout).contains("alice"));

    let out = mistguard(&["records", "query", d, "--subject", "alice"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("--subject-key-file"));
    let short = dir.path().join("short.key");
    std::fs::write(&short, b"short").unwrap();
    let out = mistguard(&[
        "records",
        "query",
        d,
        "--subject",
        "alice",
        "--subject-key-file",
        short.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("at least 32 bytes"));
    let out = mistguard(&["records", "query", d, "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(64));
    let out = mistguard(&["records", "query", d, "--since", "100000d"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout).lines().count(), 20);
}
