//! `mistguard bench`: a load generator over real gRPC, bounded in time and count, aimed only at
//! loopback addresses.
//!
//! Phases, each on the same server in the same run:
//! 1. `Ping` (an empty RPC): the baseline of what gRPC itself costs;
//! 2. `Classify` with 1 KiB and 16 KiB texts, closed loop at a fixed concurrency;
//! 3. `Classify` 1 KiB open loop at half the rate phase 2 reached (latency under load that the
//!    server can keep up with; measured from the scheduled send time, so a stall is not hidden);
//! 4. `AuthorizeToolCall` of a read-only SQL call, closed loop (`--policies` for the in-process
//!    daemon's policies);
//! 5. `ClassifyStream` with many concurrent streams sending small chunks.
//!
//! By default the daemon runs in this process on `127.0.0.1:0` with the bundled rulesets, so
//! client and server share the machine's cores.

use super::pb::guard_client::GuardClient;
use super::pb::{ClassifyRequest, ClassifyStreamRequest, PingRequest};
use super::server::{prepare, serve_with, Control, Listeners};
use super::{Config, Sources};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Address of a running daemon (loopback only). Default: start one in this process.
    #[arg(long, value_name = "ADDR")]
    pub target: Option<SocketAddr>,
    /// Rulesets of the in-process daemon (default: bundled).
    #[arg(long, value_name = "DIR")]
    pub rulesets: Option<PathBuf>,
    /// Tool-call policies of the in-process daemon, for the AuthorizeToolCall phase (default:
    /// none: the content scan and the default decision).
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// Seconds per phase (1..=60).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Where the "Classify 1 KiB, sync records" phase writes its decision records (a second
    /// in-process daemon with `records.durability = sync`); default: a fresh directory under
    /// the system's temporary directory, removed afterwards. Put it on the disk the daemon will
    /// use: the fsync is the cost. Not with --target.
    #[arg(long, value_name = "DIR")]
    pub records_dir: Option<PathBuf>,
    /// Also compare per-subject state in Redis with local state: a daemon with this `redis.url`
    /// (and a temporary subject key) and the local one take turns at Classify 1 KiB with
    /// subjects (64 per concurrent caller). Not with --target.
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// `records.commit_delay` of that daemon (e.g. `1ms`).
    #[arg(long, value_name = "DURATION", default_value = "0ms")]
    pub records_commit_delay: String,
    /// Also measure remote moderation (`moderation.input = always`) against the moderation API
    /// at this base URL (a fake on loopback: `benches/fake_mistral.py`), in turns with a daemon
    /// without it: once with the same text (answered from the cache), once with a new text per
    /// call (each asks the API, batched). The key is `bench-key`. Not with --target.
    #[arg(long, value_name = "URL")]
    pub moderation_url: Option<String>,
    /// Concurrent unary calls in the closed-loop phases.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Concurrent streams in the streaming phase.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Bytes per stream chunk.
    #[arg(long, default_value_t = 64)]
    pub chunk_bytes: usize,
    /// What the Classify phases send: benign English prose, or as many spaces (a text the
    /// engine has almost nothing to do with: what carrying it over gRPC costs alone).
    #[arg(long, value_enum, default_value_t = Payload::Prose)]
    pub payload: Payload,
}

/// The texts of the Classify phases.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    Prose,
    Spaces,
}

impl Payload {
    fn text(self, len: usize) -> String {
        match self {
            Payload::Prose => sample_text(len),
            Payload::Spaces => " ".repeat(len),
        }
    }
}

/// Hard cap on calls per phase, whatever the duration.
const MAX_CALLS_PER_PHASE: u64 = 20_000_000;

struct PhaseResult {
    name: String,
    calls: u64,
    errors: u64,
    secs: f64,
    latencies_us: Vec<u32>,
}

impl PhaseResult {
    fn named(name: &str) -> PhaseResult {
        PhaseResult {
            name: name.to_string(),
            calls: 0,
            errors: 0,
            secs: 0.0,
            latencies_us: Vec::new(),
        }
    }

    /// Adds another run of the same phase.
    fn add(&mut self, other: PhaseResult) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.secs += other.secs;
        self.latencies_us.extend(other.latencies_us);
        self.latencies_us.sort_unstable();
    }

    fn rate(&self) -> f64 {
        self.calls as f64 / self.secs
    }

    fn percentile(&self, p: f64) -> Option<f64> {
        if self.latencies_us.is_empty() {
            return None;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        Some(f64::from(self.latencies_us[i]))
    }
}

/// A benign English text of exactly `len` bytes.
pub fn sample_text(len: usize) -> String {
    const BASE: &str = "The committee reviewed the quarterly garden report, noting that tomatoes, \
        beans and squash grew well after the spring rains, while the new irrigation schedule saved \
        water without harming the young plants near the east fence. ";
    let mut s = String::with_capacity(len + BASE.len());
    while s.len() < len {
        s.push_str(BASE);
    }
    s.truncate(len);
    s
}

pub fn bench_main(args: BenchArgs) -> ExitCode {
    if !(1..=60).contains(&args.seconds)
        || args.concurrency == 0
        || args.connections == 0
        || args.streams == 0
    {
        eprintln!("mistguard bench: --seconds must be 1..=60; counts must be positive");
        return ExitCode::from(super::EXIT_CONFIG);
    }
    if args.target.is_some()
        && (args.records_dir.is_some() || args.redis_url.is_some() || args.moderation_url.is_some())
    {
        eprintln!("mistguard bench: --records-dir, --redis-url and --moderation-url are for the in-process daemons; a --target has its own");
        return ExitCode::from(super::EXIT_CONFIG);
    }
    if let Some(t) = args.target {
        if !t.ip().is_loopback() {
            eprintln!("mistguard bench: --target must be a loopback address (127.0.0.0/8 or ::1)");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mistguard bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mistguard bench: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An in-process daemon: its address, and how to stop it.
type InProcess = (
    mpsc::Sender<Control>,
    tokio::task::JoinHandle<Result<(), BoxError>>,
);

/// Starts a daemon in this process with the bench's settings and `extra` ones.
async fn start_daemon(
    args: &BenchArgs,
    extra: &[(&str, String)],
) -> Result<(SocketAddr, InProcess), BoxError> {
    let mut flags = HashMap::new();
    if let Some(dir) = &args.rulesets {
        flags.insert("rulesets".to_string(), dir.display().to_string());
    }
    if let Some(dir) = &args.policies {
        flags.insert("policies".to_string(), dir.display().to_string());
    }
    flags.insert("max_inflight".into(), "100000".into());
    flags.insert("max_streams".into(), (args.streams * 2).to_string());
    for (k, v) in extra {
        flags.insert(k.to_string(), v.clone());
    }
    let config = Config::from_sources(&Sources {
        flags,
        ..Default::default()
    })?;
    let prepared = prepare(&config)?;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = grpc.local_addr()?;
    let (tx, rx) = mpsc::channel(1);
    let task = tokio::spawn(serve_with(
        config,
        prepared,
        Listeners {
            grpc,
            metrics: None,
            console: None,
        },
        rx,
    ));
    Ok((addr, (tx, task)))
}

async fn stop_daemon((tx, task): InProcess) {
    let _ = tx.send(Control::Shutdown).await;
    let _ = tokio::time::timeout(Duration::from_secs(25), task).await;
}

async fn connect(addr: SocketAddr, n: usize) -> Result<Vec<Channel>, BoxError> {
    let mut channels = Vec::new();
    for _ in 0..n {
        channels.push(
            Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(channels)
}

async fn run(args: BenchArgs) -> Result<(), BoxError> {
    let mut server = None;
    let addr = match args.target {
        Some(a) => a,
        None => {
            let (addr, s) = start_daemon(&args, &[]).await?;
            server = Some(s);
            addr
        }
    };
    let secs = Duration::from_secs(args.seconds);
    let channels = connect(addr, args.connections.max(args.streams.div_ceil(200))).await?;
    println!(
        "mistguard bench: target {addr}{}, {} s per phase, {} concurrent calls over {} connections, Classify payload {:?}",
        if server.is_some() {
            " (in-process daemon, bundled rulesets unless --rulesets)"
        } else {
            ""
        },
        args.seconds,
        args.concurrency,
        args.connections,
        args.payload
    );

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shared_cores = if server.is_some() {
        format!(
            "client and server share this machine's {cores} cores (in-process daemon): the targets \
             assume a daemon with cores of its own; docs/DAEMON.md shows a pinned two-process run"
        )
    } else {
        format!(
            "the target runs on this machine: unless the two are pinned apart (taskset), client and \
             server share its {cores} cores"
        )
    };
    println!("note: {shared_cores}");

    let unary_channels = &channels[..args.connections.min(channels.len())];
    let ping = closed_loop(
        "Ping (empty RPC)",
        unary_channels,
        args.concurrency,
        secs,
        None,
    )
    .await;
    let text_1k = Arc::new(args.payload.text(1024));
    let text_16k = Arc::new(args.payload.text(16 * 1024));
    let c1k = closed_loop(
        "Classify 1 KiB",
        unary_channels,
        args.concurrency,
        secs,
        Some(text_1k.clone()),
    )
    .await;
    // The same load on a second daemon whose every decision is a record on disk, `sync`: the
    // answer waits for its group commit's fsync. The two daemons take turns, three rounds of a
    // third of the phase each, so the ratio compares like with like on a noisy machine.
    let with_records = match &args.target {
        Some(_) => None,
        None => {
            let (dir, temporary) = match &args.records_dir {
                Some(d) => (d.clone(), false),
                None => (
                    std::env::temp_dir()
                        .join(format!("mistguard-bench-records-{}", std::process::id())),
                    true,
                ),
            };
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("records dir {}: {e}", dir.display()))?;
            let (raddr, rserver) = start_daemon(
                &args,
                &[
                    ("records.dir", dir.display().to_string()),
                    ("records.durability", "sync".into()),
                    ("records.commit_delay", args.records_commit_delay.clone()),
                ],
            )
            .await?;
            let rch = connect(raddr, args.connections).await?;
            let (off, on) = turns(
                ("Classify 1 KiB, records off (turns)", unary_channels),
                ("Classify 1 KiB, sync records (turns)", &rch),
                args.concurrency,
                secs,
                text_1k.clone(),
            )
            .await;
            drop(rch);
            stop_daemon(rserver).await;
            if temporary {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Some((off, on))
        }
    };
    // Per-subject state in Redis against local state, taking turns (with --redis-url).
    let with_redis = match (&args.target, &args.redis_url) {
        (None, Some(url)) => {
            let key = std::env::temp_dir().join(format!(
                "mistguard-bench-subject-{}.key",
                std::process::id()
            ));
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret)?;
            std::fs::write(&key, hex_bytes(&secret))
                .map_err(|e| format!("{}: {e}", key.display()))?;
            let started = start_daemon(
                &args,
                &[
                    ("redis.url", url.clone()),
                    ("redis.required", "true".into()),
                    ("subject_key_file", key.display().to_string()),
                ],
            )
            .await;
            let _ = std::fs::remove_file(&key);
            let (raddr, rserver) = started?;
            let rch = connect(raddr, args.connections).await?;
            let with_subjects = Arc::new(format!("{SUBJECTS}{}", args.payload.text(1024)));
            let (local, shared) = turns(
                ("Classify 1 KiB+subject, local", unary_channels),
                ("Classify 1 KiB+subject, Redis", &rch),
                args.concurrency,
                secs,
                with_subjects,
            )
            .await;
            drop(rch);
            stop_daemon(rserver).await;
            Some((local, shared))
        }
        _ => None,
    };
    // Remote moderation against local verdicts alone, taking turns (with --moderation-url).
    let with_moderation = match (&args.target, &args.moderation_url) {
        (None, Some(url)) => {
            let keys = std::env::temp_dir().join(format!(
                "mistguard-bench-moderation-{}.keys",
                std::process::id()
            ));
            std::fs::write(&keys, "bench-key\n").map_err(|e| format!("{}: {e}", keys.display()))?;
            let started = start_daemon(
                &args,
                &[
                    ("moderation.url", url.clone()),
                    ("moderation.keys_file", keys.display().to_string()),
                    ("moderation.input", "always".into()),
                    ("moderation.deadline", "1s".into()),
                ],
            )
            .await;
            let (maddr, mserver) = started?;
            let mch = connect(maddr, args.connections).await?;
            // The API must answer (not fail open at once), or the figures mean nothing.
            let probe = GuardClient::new(mch[0].clone())
                .classify(ClassifyRequest {
                    text: "bench probe #cat:hate_and_discrimination".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if !probe
                .hits
                .iter()
                .any(|h| h.trigger_id == "moderation.hate_and_discrimination")
            {
                let _ = std::fs::remove_file(&keys);
                stop_daemon(mserver).await;
                return Err(format!(
                    "the moderation API at {url} gave no answer to a probe (reason {:?}); is benches/fake_mistral.py running?",
                    probe.reason
                )
                .into());
            }
            let cached = turns(
                ("Classify 1 KiB, no moderation", unary_channels),
                ("Classify 1 KiB, moderation cached", &mch),
                args.concurrency,
                secs,
                text_1k.clone(),
            )
            .await;
            let vary = Arc::new(format!("{VARY}{}", args.payload.text(1024)));
            let remote = turns(
                ("Classify 1 KiB new, no moderation", unary_channels),
                ("Classify 1 KiB new, moderation", &mch),
                args.concurrency,
                secs,
                vary,
            )
            .await;
            drop(mch);
            stop_daemon(mserver).await;
            let _ = std::fs::remove_file(&keys);
            Some([cached, remote])
        }
        _ => None,
    };
    let c16k = closed_loop(
        "Classify 16 KiB",
        unary_channels,
        args.concurrency,
        secs,
        Some(text_16k),
    )
    .await;
    let half = (c1k.rate() / 2.0).max(1.0);
    let (open, pacer) = open_loop(
        &format!("Classify 1 KiB at {half:.0}/s"),
        unary_channels,
        half,
        secs,
        text_1k,
    )
    .await;
    let authorize = closed_loop(
        "AuthorizeToolCall",
        unary_channels,
        args.concurrency,
        secs,
        Some(Arc::new(AUTHORIZE.to_string())),
    )
    .await;
    let streams = streaming(&channels, args.streams, args.chunk_bytes, secs).await?;
    // The engine alone on one thread, without gRPC: separates its cost from the daemon's.
    let engine_only = match &args.target {
        Some(_) => None,
        None => {
            let dir = args.rulesets.clone();
            let text = args.payload.text(1024);
            Some(tokio::task::spawn_blocking(move || engine_only(dir, &text, secs)).await??)
        }
    };

    println!();
    println!(
        "{:<34} {:>10} {:>8} {:>12} {:>9} {:>9}",
        "phase", "calls", "errors", "per second", "p50 µs", "p99 µs"
    );
    let turns: Vec<&PhaseResult> = with_records
        .iter()
        .chain(with_redis.iter())
        .chain(with_moderation.iter().flatten())
        .flat_map(|(a, b)| [a, b])
        .collect();
    for r in [&ping, &c1k]
        .into_iter()
        .chain(turns)
        .chain([&c16k, &open, &pacer, &authorize, &streams])
        .chain(engine_only.as_ref())
    {
        let p = |q| {
            r.percentile(q)
                .map_or("-".to_string(), |v| format!("{v:.0}"))
        };
        println!(
            "{:<34} {:>10} {:>8} {:>12.0} {:>9} {:>9}",
            r.name,
            r.calls,
            r.errors,
            r.rate(),
            p(0.5),
            p(0.99)
        );
    }
    let ratio = c1k.rate() / ping.rate() * 100.0;
    println!();
    println!(
        "Classify 1 KiB throughput: {ratio:.0}% of the empty RPC (target >= 70%): {}",
        if ratio >= 70.0 { "met" } else { "NOT met" }
    );
    let tool_ratio = authorize.rate() / ping.rate() * 100.0;
    println!(
        "AuthorizeToolCall throughput: {tool_ratio:.0}% of the empty RPC (target >= 70%): {}",
        if tool_ratio >= 70.0 { "met" } else { "NOT met" }
    );
    if let Some((off, on)) = &with_records {
        let ratio = on.rate() / off.rate();
        println!(
            "Classify 1 KiB with sync decision records: {ratio:.2} of records off (target >= 0.8): {}",
            if ratio >= 0.8 { "met" } else { "NOT met" }
        );
    }
    if let Some((local, shared)) = &with_redis {
        println!(
            "Classify 1 KiB with a subject, state in Redis: {:.2} of local state",
            shared.rate() / local.rate()
        );
    }
    if let Some([(off, cached), (off_new, remote)]) = &with_moderation {
        println!(
            "Classify 1 KiB with remote moderation, answered from the cache: {:.2} of none",
            cached.rate() / off.rate()
        );
        println!(
            "Classify 1 KiB with remote moderation, a new text per call: {:.2} of none (p50 {} µs against {} µs)",
            remote.rate() / off_new.rate(),
            remote.percentile(0.5).map_or("-".into(), |v| format!("{v:.0}")),
            off_new.percentile(0.5).map_or("-".into(), |v| format!("{v:.0}")),
        );
    }
    let p99 = open.percentile(0.99).unwrap_or(f64::INFINITY);
    println!(
        "Classify 1 KiB p99 at half that rate: {p99:.0} µs (target < 1000 µs): {}",
        if p99 < 1000.0 { "met" } else { "NOT met" }
    );
    if ratio < 70.0 || p99 >= 1000.0 {
        println!("(measured while {shared_cores})");
    }

    if let Some(s) = server {
        stop_daemon(s).await;
    }
    Ok(())
}

/// The marker text of the AuthorizeToolCall phase.
const AUTHORIZE: &str = "\u{0}authorize";

/// The prefix of a Classify text sent with subjects (`bench-<caller>-<n % 64>`).
const SUBJECTS: &str = "\u{0}subjects:";

/// The prefix of a Classify text made new at each call (a counter appended): nothing is cached.
const VARY: &str = "\u{0}vary:";
static VARY_SEQ: AtomicU64 = AtomicU64::new(0);

fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The AuthorizeToolCall phase's call: a read-only query an agent makes all day.
fn authorize_request() -> super::pb::AuthorizeToolCallRequest {
    super::pb::AuthorizeToolCallRequest {
        tool: "execute_sql".into(),
        arguments_json: r#"{"statement":"SELECT count(*) FROM events WHERE day = '2026-12-06'","database":"analytics"}"#.into(),
        context_json: r#"{"environment":"production","user_role":"analyst"}"#.into(),
        subject: "bench-agent".into(),
        ..Default::default()
    }
}

/// Two daemons take turns at the same closed-loop load, three rounds of a third of `secs` each,
/// so a noisy machine affects both alike.
async fn turns(
    a: (&str, &[Channel]),
    b: (&str, &[Channel]),
    concurrency: usize,
    secs: Duration,
    text: Arc<String>,
) -> (PhaseResult, PhaseResult) {
    let third = (secs / 3).max(Duration::from_millis(500));
    let (mut ra, mut rb) = (PhaseResult::named(a.0), PhaseResult::named(b.0));
    for _ in 0..3 {
        ra.add(closed_loop("", a.1, concurrency, third, Some(text.clone())).await);
        rb.add(closed_loop("", b.1, concurrency, third, Some(text.clone())).await);
    }
    (ra, rb)
}

async fn closed_loop(
    name: &str,
    channels: &[Channel],
    concurrency: usize,
    dur: Duration,
    text: Option<Arc<String>>,
) -> PhaseResult {
    let calls = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + dur;
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut client = GuardClient::new(channels[i % channels.len()].clone());
        let text = text.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < end
                && calls.fetch_add(1, Ordering::Relaxed) < MAX_CALLS_PER_PHASE
            {
                let t = Instant::now();
                let ok = match &text {
                    None => client.ping(PingRequest {}).await.is_ok(),
                    Some(s) if s.as_str() == AUTHORIZE => client
                        .authorize_tool_call(authorize_request())
                        .await
                        .is_ok(),
                    Some(s) => {
                        let (text, subject) = match s.strip_prefix(SUBJECTS) {
                            Some(t) => (t.to_owned(), format!("bench-{i}-{}", lat.len() % 64)),
                            None => match s.strip_prefix(VARY) {
                                Some(t) => (
                                    format!("{t} {}", VARY_SEQ.fetch_add(1, Ordering::Relaxed)),
                                    String::new(),
                                ),
                                None => (s.to_string(), String::new()),
                            },
                        };
                        client
                            .classify(ClassifyRequest {
                                text,
                                subject,
                                ..Default::default()
                            })
                            .await
                            .is_ok()
                    }
                };
                lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                errors += u64::from(!ok);
            }
            (lat, errors)
        }));
    }
    collect(name, tasks, start).await
}

async fn collect(
    name: &str,
    tasks: Vec<tokio::task::JoinHandle<(Vec<u32>, u64)>>,
    start: Instant,
) -> PhaseResult {
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            latencies_us.extend(l);
            errors += e;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    PhaseResult {
        name: name.to_string(),
        calls: latencies_us.len() as u64,
        errors,
        secs,
        latencies_us,
    }
}

/// Sends at a fixed rate whatever the responses do; latency counts from the scheduled time.
///
/// The sends are paced by a dedicated OS thread that sleeps until each scheduled instant (about
/// 60 µs of timer slack here) and hands the call to the runtime: tokio's timer has a 1 ms tick,
/// which would release the calls in bursts and add up to a millisecond to every latency. How late
/// the pacer itself was is returned too, so it is not mistaken for the server's latency.
async fn open_loop(
    name: &str,
    channels: &[Channel],
    rate: f64,
    dur: Duration,
    text: Arc<String>,
) -> (PhaseResult, PhaseResult) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = ((dur.as_secs_f64() * rate) as u64).min(MAX_CALLS_PER_PHASE);
    // At most this many calls outstanding; beyond it the phase records an error, not a queue.
    let outstanding = Arc::new(tokio::sync::Semaphore::new(4096));
    let (tx, mut rx) = mpsc::unbounded_channel::<(u32, bool)>();
    let clients: Vec<_> = channels
        .iter()
        .map(|c| GuardClient::new(c.clone()))
        .collect();
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now();
    let pacer = std::thread::spawn(move || {
        let mut late_us = Vec::with_capacity(total as usize);
        for n in 0..total {
            let scheduled = start + interval.mul_f64(n as f64);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            late_us.push(scheduled.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                let _ = tx.send((u32::MAX, false));
                continue;
            };
            let mut client = clients[n as usize % clients.len()].clone();
            let text = text.clone();
            let tx = tx.clone();
            handle.spawn(async move {
                let ok = client
                    .classify(ClassifyRequest {
                        text: text.as_str().to_owned(),
                        ..Default::default()
                    })
                    .await
                    .is_ok();
                let us = scheduled.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                let _ = tx.send((us, ok));
                drop(permit);
            });
        }
        late_us
    });
    let mut latencies_us = Vec::with_capacity(total as usize);
    let mut errors = 0;
    while let Some((us, ok)) = rx.recv().await {
        latencies_us.push(us);
        errors += u64::from(!ok);
    }
    let secs = start.elapsed().as_secs_f64();
    let mut late_us = tokio::task::spawn_blocking(move || pacer.join().unwrap_or_default())
        .await
        .unwrap_or_default();
    latencies_us.sort_unstable();
    late_us.sort_unstable();
    let sends = PhaseResult {
        name: "  (pacer: lateness of the sends)".to_string(),
        calls: late_us.len() as u64,
        errors: 0,
        secs,
        latencies_us: late_us,
    };
    let calls = PhaseResult {
        name: name.to_string(),
        calls: latencies_us.len() as u64,
        errors,
        secs,
        latencies_us,
    };
    (calls, sends)
}

/// `Engine::classify` of a 1 KiB text in a loop on one thread (no gRPC, no daemon).
fn engine_only(dir: Option<PathBuf>, text: &str, dur: Duration) -> Result<PhaseResult, BoxError> {
    let engine = super::server::load_engine(dir.as_deref(), &crate::load::Models::Bundled)?;
    let opts = crate::engine::ClassifyOptions::default();
    let start = Instant::now();
    let mut latencies_us = Vec::new();
    while start.elapsed() < dur && (latencies_us.len() as u64) < MAX_CALLS_PER_PHASE {
        let t = Instant::now();
        std::hint::black_box(engine.classify(std::hint::black_box(text), &opts));
        latencies_us.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    let secs = start.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    Ok(PhaseResult {
        name: "engine only, 1 KiB, 1 thread".into(),
        calls: latencies_us.len() as u64,
        errors: 0,
        secs,
        latencies_us,
    })
}

/// `streams` concurrent streams, each sending a chunk and waiting for its response, for `dur`.
async fn streaming(
    channels: &[Channel],
    streams: usize,
    chunk_bytes: usize,
    dur: Duration,
) -> Result<PhaseResult, BoxError> {
    let chunk = Arc::new(sample_text(chunk_bytes.max(1)));
    let start = Instant::now();
    let end = start + dur;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let mut client = GuardClient::new(channels[i % channels.len()].clone());
        let chunk = chunk.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let (tx, rx) = mpsc::channel(2);
            let Ok(resp) = client.classify_stream(ReceiverStream::new(rx)).await else {
                return (lat, 1);
            };
            let mut resp = resp.into_inner();
            while Instant::now() < end && (lat.len() as u64) < MAX_CALLS_PER_PHASE / 1000 {
                let t = Instant::now();
                if tx
                    .send(ClassifyStreamRequest {
                        text: chunk.as_str().to_owned(),
                        ..Default::default()
                    })
                    .await
                    .is_err()
                {
                    errors += 1;
                    break;
                }
                match resp.message().await {
                    Ok(Some(r)) if !r.r#final => {
                        lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
                    }
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            drop(tx);
            while let Ok(Some(_)) = resp.message().await {}
            (lat, errors)
        }));
    }
    let mut r = collect(
        &format!("ClassifyStream {streams} streams, {chunk_bytes} B"),
        tasks,
        start,
    )
    .await;
    r.name = format!("stream chunks ({streams} streams, {chunk_bytes} B)");
    Ok(r)
}
