//! Helpers for the daemon's integration tests: test rulesets, an in-process daemon on
//! `127.0.0.1:0`, the real binary, and a minimal `/metrics` scraper.
#![allow(dead_code)]

pub mod fake_chat;
pub mod fake_mistral;
pub mod loopback;

use mistguard::daemon::pb::guard_client::GuardClient;
use mistguard::daemon::{prepare, serve_with, Config, Control, Listeners, Sources};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// A phrase of RULE-MIST-001 (BLOCK) that exists only in the test rulesets.
pub const BLOCK_PHRASE: &str = "zorblax must be destroyed";
/// A phrase of RULE-MIST-009 (SANITIZE).
pub const INJECTION_PHRASE: &str = "ignore previous instructions";
/// A phrase of RULE-MIST-010 (RATE_LIMIT).
pub const EXTRACTION_PHRASE: &str = "distill your weights";
/// A phrase of RULE-MIST-005 (BLOCK, level 2 on the first hit).
pub const CSAM_PHRASE: &str = "quuxle forbidden marker";
/// A phrase added by the reload test.
pub const RELOAD_PHRASE: &str = "plonkish glyph sequence";

/// How long one step of a test (a call, a start) may take before the test fails.
pub const STEP: Duration = Duration::from_secs(30);

/// Awaits `f`, failing the test past [`STEP`].
pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .expect("test step timed out")
}

/// A Classify request of `text` from `subject`.
pub fn subject_req(text: &str, subject: &str) -> mistguard::daemon::pb::ClassifyRequest {
    mistguard::daemon::pb::ClassifyRequest {
        text: text.into(),
        subject: subject.into(),
        ..Default::default()
    }
}

/// The test triggers: (file, rule, action, trigger id, phrase).
const TEST_TRIGGERS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "mist-001.toml",
        "RULE-MIST-001",
        "block",
        "daemon.test.harm",
        BLOCK_PHRASE,
    ),
    (
        "mist-005.toml",
        "RULE-MIST-005",
        "block",
        "daemon.test.csam",
        CSAM_PHRASE,
    ),
    (
        "mist-009.toml",
        "RULE-MIST-009",
        "sanitize",
        "daemon.test.override",
        INJECTION_PHRASE,
    ),
    (
        "mist-010.toml",
        "RULE-MIST-010",
        "rate_limit",
        "daemon.test.extract",
        EXTRACTION_PHRASE,
    ),
];

/// A temporary rulesets directory: the bundled `policy.toml` (copied from `rulesets/`) and one
/// file per rule holding only the test triggers. Small on purpose: compiling the full bundled
/// rulesets takes minutes in a debug build on two cores, and the tests must not depend on the
/// bundled trigger lists.
pub struct TestRules {
    pub dir: tempfile::TempDir,
}

impl TestRules {
    pub fn new() -> TestRules {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("rulesets")
            .join("policy.toml");
        match std::fs::read_to_string(&src) {
            Ok(mut policy) => {
                policy.push_str("\n# daemon tests\n");
                policy = policy.replacen("version = \"", "version = \"daemon-test-", 1);
                std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
            }
            Err(_) => {
                let mut text = String::from("version = \"daemon-test\"\n");
                for (_, rule, action, _, _) in TEST_TRIGGERS {
                    text.push_str(&format!(
                        "\n[rules.\"{rule}\"]\naction = \"{action}\"\nthreshold = 1.0\n"
                    ));
                }
                std::fs::write(dir.path().join("policy.toml"), text).unwrap();
            }
        }
        let rules = TestRules { dir };
        for (file, rule, _, id, phrase) in TEST_TRIGGERS {
            rules.add_trigger(file, rule, id, phrase);
        }
        rules
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies a bundled rule file (`pii.toml`, `secrets.toml`, `markup.toml`, `leak.toml`: the
    /// neutral ones, quick to compile) into the directory.
    pub fn add_bundled(&self, file: &str) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("rulesets")
            .join(file);
        std::fs::copy(&src, self.dir.path().join(file))
            .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    }

    /// Appends `text` to the directory's policy.toml.
    pub fn append_policy(&self, text: &str) {
        let path = self.dir.path().join("policy.toml");
        let mut policy = std::fs::read_to_string(&path).unwrap();
        policy.push_str(text);
        std::fs::write(path, policy).unwrap();
    }

    /// Appends a trigger to `file` (created with its rule header if missing).
    pub fn add_trigger(&self, file: &str, rule: &str, id: &str, phrase: &str) {
        let path = self.dir.path().join(file);
        let mut text = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| format!("rule = \"{rule}\"\nname = \"{rule} (daemon tests)\"\n"));
        text.push_str(&format!(
            "\n[[trigger]]\nid = \"{id}\"\nlang = \"en\"\nphrases = [\"{phrase}\"]\n"
        ));
        std::fs::write(path, text).unwrap();
    }
}

/// A daemon served in this process by `serve_with`.
pub struct Daemon {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The review console's address, when the settings turn it on (`console_listen`).
    pub console_addr: Option<SocketAddr>,
    pub control: mpsc::Sender<Control>,
    pub task: tokio::task::JoinHandle<Result<(), Box<dyn std::error::Error + Send + Sync>>>,
    pub rules: TestRules,
    /// The `version` of the rulesets it started with.
    pub ruleset_version: String,
}

impl Daemon {
    /// Starts a daemon with the test rulesets and `settings` (keys as in the config file).
    pub async fn start(settings: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(TestRules::new(), settings).await
    }

    pub async fn start_with(rules: TestRules, settings: &[(&str, &str)]) -> Daemon {
        Daemon::start_keyed(rules, settings, "").await
    }

    /// As [`Daemon::start_with`], with `keys` as `MISTRAL_API_KEYS` (comma-separated; "" for
    /// none).
    pub async fn start_keyed(rules: TestRules, settings: &[(&str, &str)], keys: &str) -> Daemon {
        let mut flags: HashMap<String, String> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        flags.insert("rulesets".into(), rules.path().display().to_string());
        let config = Config::from_sources(
            &Sources {
                flags,
                ..Default::default()
            }
            .with_env([("MISTRAL_API_KEYS", keys)]),
        )
        .expect("config");
        let prepared = prepare(&config).expect("prepare");
        let ruleset_version = prepared.engine.version().to_string();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let console = match config.console_listen {
            Some(a) => Some(TcpListener::bind(a).await.unwrap()),
            None => None,
        };
        let console_addr = console.as_ref().map(|l| l.local_addr().unwrap());
        let (control, rx) = mpsc::channel(4);
        let task = tokio::spawn(serve_with(
            config,
            prepared,
            Listeners {
                grpc,
                metrics: Some(metrics),
                console,
            },
            rx,
        ));
        Daemon {
            addr,
            metrics_addr,
            console_addr,
            control,
            task,
            rules,
            ruleset_version,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    pub async fn client(&self) -> GuardClient<Channel> {
        GuardClient::new(self.channel().await)
    }

    pub async fn metrics(&self) -> String {
        scrape(self.metrics_addr).await
    }
}

/// `GET /metrics` over plain HTTP/1.1; returns the body.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut sock = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics connect");
    sock.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    sock.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of a metric line `name{labels} value` whose name and labels contain all of `parts`;
/// sums over matching lines. 0 when absent.
pub fn metric_value(body: &str, name: &str, parts: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The binary under test: this build's, or `MISTGUARD_TEST_BIN` (to run a test against another
/// build, e.g. the one before a fix, and see it fail).
pub fn binary() -> PathBuf {
    std::env::var_os("MISTGUARD_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mistguard")))
}

/// How [`Process::spawn_with`] starts the daemon.
#[derive(Default)]
pub struct Spawn {
    /// Sent 20 ms after the start, while the rulesets compile.
    pub early_signal: Option<i32>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Close the read end of the daemon's stderr once it has said where it serves.
    pub close_stderr_once_serving: bool,
    /// The gRPC listen address (default `127.0.0.1:0`).
    pub listen: Option<String>,
}

/// The `mistguard serve` binary, with its stderr captured line by line.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Spawns `mistguard serve` on `127.0.0.1:0` with JSON logs and waits for it to serve.
    pub fn spawn(rulesets: &Path, extra: &[&str]) -> Process {
        Process::spawn_signalled(rulesets, extra, None)
    }

    /// [`Process::spawn`], sending `early` to the daemon 20 ms after it started (while it is
    /// still compiling its rulesets, on any machine this runs on), before waiting for it to
    /// serve.
    pub fn spawn_signalled(rulesets: &Path, extra: &[&str], early: Option<i32>) -> Process {
        Process::spawn_with(
            rulesets,
            extra,
            Spawn {
                early_signal: early,
                ..Spawn::default()
            },
        )
    }

    /// [`Process::spawn`] with the options of `how`.
    pub fn spawn_with(rulesets: &Path, extra: &[&str], how: Spawn) -> Process {
        let early = how.early_signal;
        let mut cmd = Command::new(binary());
        cmd.envs(how.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.args([
            "serve",
            "--listen",
            how.listen.as_deref().unwrap_or("127.0.0.1:0"),
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--rulesets")
        .arg(rulesets)
        .args(extra)
        .env_remove("MISTGUARD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn mistguard");
        if let Some(sig) = early {
            // After the program has started (a signal in its first millisecond, before `main`,
            // meets the default action whatever the program does), while it compiles rules.
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: kill(2) on the pid of a child this process has not waited for.
            unsafe {
                libc::kill(child.id() as i32, sig);
            }
        }
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = BufReader::new(child.stderr.take().unwrap());
        let lines = stderr.clone();
        let close = how.close_stderr_once_serving;
        std::thread::spawn(move || {
            let mut serving = (false, false);
            for line in reader.lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                serving.0 |= line.contains("mistguard serving");
                serving.1 |= line.contains("metrics_addr");
                lines.lock().unwrap().push(line);
                if close && serving.0 && serving.1 {
                    // Dropping the reader closes the pipe's read end: from now on every write
                    // to the daemon's stderr fails (EPIPE).
                    return;
                }
            }
        });
        let (mut addr, mut metrics_addr) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while addr.is_none() || metrics_addr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("daemon did not start; stderr: {:?}", stderr.lock().unwrap())
            });
            if let Some(a) = json_field(&line, "metrics_addr") {
                metrics_addr = a.parse().ok();
            } else if line.contains("mistguard serving") {
                addr = json_field(&line, "addr").and_then(|a| a.parse().ok());
            }
        }
        Process {
            child,
            addr: addr.unwrap(),
            metrics_addr: metrics_addr.unwrap(),
            stderr,
        }
    }

    pub async fn client(&self) -> GuardClient<Channel> {
        GuardClient::new(
            Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
                .expect("connect"),
        )
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit, up to `limit`; kills it and panics past that.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("daemon did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The JSON log lines whose `target` is `target` (`mistguard::decision`, ...).
    pub fn log_records(&self, target: &str) -> Vec<serde_json::Value> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("target").and_then(|t| t.as_str()) == Some(target))
            .collect()
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self
            .stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
        {
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The string value of `"name":"value"` in a JSON log line.
fn json_field(line: &str, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get(name)?.as_str().map(str::to_string)
}

pub fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A real `redis-server` on a free loopback port, stopped (killed and reaped) on drop. No mock:
/// `.ci/run` installs Debian's `redis-server`; without it the test fails and says so.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = RedisServer { child: None, port };
        s.restart();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server (again) on the same port, empty (no persistence), and waits until it
    /// answers PING.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server is not installed: apt-get install -y redis-server (.ci/run does)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// Kills the server (the daemon sees an outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A subject key file of 32 random-looking bytes that replicas share.
pub fn shared_subject_key(dir: &Path) -> PathBuf {
    let p = dir.join("subject.key");
    std::fs::write(&p, "0123456789abcdef0123456789abcdef-shared-test-key\n").unwrap();
    p
}

/// Every complete line of every `<stream>-*.jsonl` record segment in `dir`, parsed, oldest
/// first (none when the directory does not exist; a torn last line is left out).
pub fn record_lines(dir: &Path, stream: &str) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&format!("{stream}-")) && n.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            out.push(serde_json::from_str(line).unwrap());
        }
    }
    out
}
