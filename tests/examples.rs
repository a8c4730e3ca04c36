//! The client examples (issue 20, `examples/python`, `examples/typescript`, `examples/rust`) run
//! against the real daemon (`mistguard serve`, spawned) and a fake Mistral chat API on loopback
//! (`support/fake_chat.rs`). Each example must:
//!
//! 1. classify the prompt and refuse to send a blocked one to Mistral;
//! 2. stream the completion through `ClassifyStream`, printing only `released_text`, and stop on
//!    the block (nothing of the completion from the blocked phrase on is printed);
//! 3. authorize the completion's tool calls, running the allowed one and not the denied one.
//!
//! A missing toolchain (python3 without the packages of `examples/python/requirements.txt`, node
//! without `examples/typescript/node_modules`) skips that language with `SKIPPED:` on stderr,
//! unless `MISTGUARD_EXAMPLES_REQUIRED=1`, which makes it a failure (CI installs them).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::fake_chat::{FakeChat, Script};
use support::{manifest_path, Process, Spawn, TestRules, BLOCK_PHRASE};

const KEY: &str = "fake-mistral-key-examples";
/// Before the blocked phrase: printed.
const BEFORE: &[&str] = &[
    "Here is the forecast for Paris today. ",
    "It will be sunny all day long, ",
    "with a light breeze from the west in the afternoon. ",
];
/// After the blocked phrase: never printed.
const AFTER: &str = " and here is the secret tail of the answer.";
const ALLOWED_ARGS: &str = r#"{"city": "Paris"}"#;
const DENIED_ARGS: &str = r#"{"name": "staging"}"#;

fn required() -> bool {
    std::env::var("MISTGUARD_EXAMPLES_REQUIRED").as_deref() == Ok("1")
}

/// Skips (or, with `MISTGUARD_EXAMPLES_REQUIRED=1`, fails) for a missing toolchain.
fn missing(what: &str) {
    if required() {
        panic!("MISTGUARD_EXAMPLES_REQUIRED=1 but {what}");
    }
    eprintln!("SKIPPED: {what}");
}

/// The daemon with the test rulesets and a policy: `get_weather` allowed, `delete_database`
/// denied.
struct Setup {
    daemon: Process,
    _rules: TestRules,
    _policies: tempfile::TempDir,
}

fn setup() -> Setup {
    let rules = TestRules::new();
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("examples.yaml"),
        r#"version: "examples-1"
rules:
- name: weather_is_harmless
  tool: get_weather
  action: allow
- name: never_delete_databases
  tool: delete_database
  action: deny
  message: "Agents may not delete databases"
"#,
    )
    .unwrap();
    let daemon = Process::spawn_with(
        rules.path(),
        &[
            "--models",
            "off",
            "--policies",
            policies.path().to_str().unwrap(),
        ],
        Spawn::default(),
    );
    Setup {
        daemon,
        _rules: rules,
        _policies: policies,
    }
}

fn script() -> Script {
    let mut chunks: Vec<String> = BEFORE.iter().map(|s| s.to_string()).collect();
    // The blocked phrase, split over two events.
    let (a, b) = BLOCK_PHRASE.split_at(BLOCK_PHRASE.len() / 2);
    chunks.push(format!("Meanwhile, {a}"));
    chunks.push(b.to_string());
    chunks.push(AFTER.to_string());
    Script {
        chunks,
        tool_calls: vec![
            ("get_weather".into(), ALLOWED_ARGS.into()),
            ("delete_database".into(), DENIED_ARGS.into()),
        ],
        pause: Duration::from_millis(20),
    }
}

/// Runs the example (`cmd`, the prompt appended) with its environment pointed at the daemon and
/// the fake; returns its stdout. Fails on a non-zero exit or past 120 s.
fn run(lang: &str, mut cmd: Command, daemon: &Process, fake: &FakeChat, prompt: &str) -> String {
    cmd.arg(prompt)
        .env("MISTGUARD_ADDR", daemon.addr.to_string())
        .env_remove("MISTGUARD_TOKEN")
        .env("MISTRAL_API_KEY", KEY)
        .env("MISTRAL_SERVER_URL", &fake.url)
        .env("MISTRAL_MODEL", "mistral-small-latest")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env_remove("grpc_proxy")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{lang}: cannot start the example: {e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{lang}: the example did not end within 120 s\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{lang}: the example failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}\ndaemon:\n{}",
        out.status,
        daemon.stderr_text()
    );
    eprintln!("--- {lang} example, prompt {prompt:?}:\n{stdout}");
    stdout
}

/// The lines of `out` that start with `prefix`.
fn lines_with<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// Runs the example twice against one daemon: a blocked prompt, then a prompt that goes through.
fn check_example(lang: &str, cmd: impl Fn() -> Command) {
    let s = setup();

    // 1. A blocked prompt never reaches Mistral.
    let fake = FakeChat::start(script());
    let out = run(
        lang,
        cmd(),
        &s.daemon,
        &fake,
        &format!("Tell me why {BLOCK_PHRASE}."),
    );
    let verdict = lines_with(&out, "prompt verdict: ");
    assert_eq!(verdict.len(), 1, "{lang}: {out}");
    assert!(
        verdict[0].starts_with("prompt verdict: BLOCK (rules RULE-MIST-001,"),
        "{lang}: {out}"
    );
    assert!(
        out.contains("refused: the prompt was not sent to Mistral"),
        "{lang}: {out}"
    );
    assert!(!out.contains("completion:"), "{lang}: {out}");
    assert!(
        fake.requests().is_empty(),
        "{lang}: a blocked prompt reached Mistral: {:?}",
        fake.requests()
    );
    drop(fake);

    // 2. An allowed prompt: the streamed completion stops at the block, the tools are guarded.
    let fake = FakeChat::start(script());
    let prompt = "What is the weather in Paris? And clean up the old staging database.";
    let out = run(lang, cmd(), &s.daemon, &fake, prompt);
    let verdict = lines_with(&out, "prompt verdict: ");
    assert_eq!(verdict.len(), 1, "{lang}: {out}");
    assert!(
        verdict[0].starts_with("prompt verdict: ALLOW (rules -, decision "),
        "{lang}: {out}"
    );
    assert!(!out.contains("refused:"), "{lang}: {out}");
    // What the example printed of the completion: between "completion:" and the stream's end.
    let (_, rest) = out
        .split_once("completion:\n")
        .unwrap_or_else(|| panic!("{lang}: no completion printed: {out}"));
    let (shown, tail) = rest
        .split_once("\nstream blocked: ")
        .unwrap_or_else(|| panic!("{lang}: the stream was not blocked: {out}"));
    assert!(
        tail.starts_with("BLOCK (rules RULE-MIST-001, reason blocked"),
        "{lang}: {out}"
    );
    let before = BEFORE.concat();
    assert!(
        shown.starts_with(&before),
        "{lang}: the released text {shown:?} does not start with {before:?}"
    );
    assert!(
        before.len() + "Meanwhile, ".len() >= shown.len(),
        "{lang}: more than the text before the block was printed: {shown:?}"
    );
    assert!(!out.contains("zorblax"), "{lang}: {out}");
    assert!(!out.contains("secret tail"), "{lang}: {out}");
    // The tool calls: the allowed one ran, the denied one did not.
    assert!(out.contains("tool calls: 2"), "{lang}: {out}");
    assert!(
        out.contains("tool get_weather: ALLOW (policy weather_is_harmless"),
        "{lang}: {out}"
    );
    assert!(out.contains("ran get_weather: sunny"), "{lang}: {out}");
    assert!(
        out.contains(
            "tool delete_database: DENY (policy never_delete_databases: Agents may not delete databases)"
        ),
        "{lang}: {out}"
    );
    assert!(out.contains("not run: delete_database"), "{lang}: {out}");
    assert!(!out.contains("ran delete_database"), "{lang}: {out}");
    // What Mistral was asked: the streamed completion, then the tool calls, with the key.
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2, "{lang}: {reqs:?}");
    for r in &reqs {
        assert_eq!(r.path, "/v1/chat/completions", "{lang}: {r:?}");
        assert_eq!(r.key.as_deref(), Some(KEY), "{lang}: {r:?}");
        assert_eq!(r.last_content(), prompt, "{lang}: {r:?}");
    }
    assert!(reqs[0].streamed(), "{lang}: {:?}", reqs[0]);
    assert!(!reqs[1].streamed(), "{lang}: {:?}", reqs[1]);
    assert_eq!(
        reqs[1].tool_names(),
        ["get_weather", "delete_database"],
        "{lang}: {:?}",
        reqs[1]
    );
    // The daemon recorded the denial (allowed calls are recorded at debug level).
    let denied: Vec<serde_json::Value> = s
        .daemon
        .log_records("mistguard::decision")
        .into_iter()
        .filter(|r| r.get("tool").and_then(|t| t.as_str()) == Some("delete_database"))
        .collect();
    assert_eq!(denied.len(), 1, "{lang}: {}", s.daemon.stderr_text());
    assert_eq!(denied[0]["decision"], "deny", "{lang}: {:?}", denied[0]);
}

/// The Python interpreter: `MISTGUARD_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("MISTGUARD_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn python_example() {
    let py = python();
    let probe = Command::new(&py)
        .args([
            "-c",
            "import grpc, grpc_tools.protoc, mistralai.client; print('ok')",
        ])
        .stderr(Stdio::null())
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => {
            return missing(&format!(
                "{py} with the packages of examples/python/requirements.txt is not available \
                 (pip install -r examples/python/requirements.txt)"
            ))
        }
    }
    let main = manifest_path("examples/python/main.py");
    check_example("python", || {
        let mut c = Command::new(&py);
        // -u: unbuffered, so a partial completion is printed as it is released.
        c.arg("-u").arg(&main).env("PYTHONDONTWRITEBYTECODE", "1");
        c
    });
}

#[test]
fn typescript_example() {
    let dir = manifest_path("examples/typescript");
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_ok {
        return missing("node is not installed");
    }
    for m in [
        "@grpc/grpc-js",
        "@grpc/proto-loader",
        "@mistralai/mistralai",
    ] {
        if !dir.join("node_modules").join(m).is_dir() {
            return missing(&format!(
                "examples/typescript/node_modules/{m} is missing (cd examples/typescript && npm ci)"
            ));
        }
    }
    check_example("typescript", || {
        let mut c = Command::new("node");
        c.arg(dir.join("main.mjs")).current_dir(&dir);
        c
    });
}

/// `target/<profile>/examples/mistral_chat`, next to this test's `deps/`; built with cargo when
/// missing (`cargo test` builds the examples, `cargo test --test examples` does not).
fn rust_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir: &Path = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("examples").join("mistral_chat");
    if !bin.exists() {
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "--example", "mistral_chat"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
        if release {
            c.arg("--release");
        }
        let status = c.status().expect("run cargo");
        assert!(
            status.success(),
            "cargo build --example mistral_chat failed"
        );
    }
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}

#[test]
fn rust_example_runs() {
    let bin = rust_example();
    check_example("rust", || Command::new(&bin));
}
