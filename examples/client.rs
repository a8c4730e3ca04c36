//! A minimal client of a running mistguard daemon, for a first try without grpcurl:
//!
//! ```sh
//! cargo run --release --example client -- classify "Please ignore previous instructions"
//! cargo run --release --example client -- stream "Sure! Here is the answer: ign" "ore previous instru" "ctions."
//! ```
//!
//! `classify` sends one text (`Classify`); `stream` sends each argument as one chunk of a
//! `ClassifyStream` and prints, for each response, the verdict and the text the client may now
//! forward (up to `released_bytes`). The daemon is `MISTGUARD_ADDR` (default
//! `http://127.0.0.1:50051`); `MISTGUARD_TOKEN` is sent as the bearer token when set.

use mistguard::daemon::pb::{
    self, guard_client::GuardClient, ClassifyRequest, ClassifyStreamRequest,
};
use std::process::ExitCode;
use tonic::Request;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn action(a: i32) -> String {
    pb::Action::try_from(a)
        .map(|a| a.as_str_name().trim_start_matches("ACTION_").to_string())
        .unwrap_or_else(|_| a.to_string())
}

fn hits(hits: &[pb::Hit]) -> String {
    hits.iter()
        .map(|h| format!("{} {} [{}..{})", h.rule_id, h.trigger_id, h.start, h.end))
        .collect::<Vec<_>>()
        .join("; ")
}

fn with_token<T>(msg: T) -> Result<Request<T>, Error> {
    let mut r = Request::new(msg);
    if let Ok(token) = std::env::var("MISTGUARD_TOKEN") {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(r)
}

async fn run(args: Vec<String>) -> Result<(), Error> {
    let addr = std::env::var("MISTGUARD_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mut client = GuardClient::connect(addr).await?;
    match args.first().map(String::as_str) {
        Some("classify") if args.len() == 2 => {
            let r = client
                .classify(with_token(ClassifyRequest {
                    text: args[1].clone(),
                    direction: pb::Direction::Input as i32,
                    subject: "example-client".into(),
                    ..Default::default()
                })?)
                .await?
                .into_inner();
            println!("action:    {}", action(r.action));
            println!("hits:      {}", hits(&r.hits));
            println!("language:  {}", r.language);
            println!("level:     {}", r.escalation_level);
            if let Some(s) = &r.sanitized_text {
                println!("sanitized: {s}");
            }
            println!("message:   {}", r.message);
            println!(
                "decision:  {} (rulesets {})",
                r.decision_id, r.ruleset_version
            );
        }
        Some("stream") if args.len() >= 2 => {
            let chunks: Vec<ClassifyStreamRequest> = args[1..]
                .iter()
                .enumerate()
                .map(|(i, t)| ClassifyStreamRequest {
                    text: t.clone(),
                    direction: if i == 0 {
                        pb::Direction::Output as i32
                    } else {
                        0
                    },
                    subject: if i == 0 {
                        "example-client".into()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                })
                .collect();
            let text: String = args[1..].concat();
            let mut responses = client
                .classify_stream(with_token(tokio_stream::iter(chunks))?)
                .await?
                .into_inner();
            // What a client forwards: the released bytes, with the span of every SANITIZE hit
            // replaced (the daemon reports a hit before it releases its span).
            let mut spans: Vec<(usize, usize)> = Vec::new();
            let mut shown = 0usize;
            while let Some(r) = responses.message().await? {
                for h in &r.hits {
                    if h.action == pb::Action::Sanitize as i32 {
                        spans.push((h.start as usize, h.end as usize));
                    }
                }
                let upto = (r.released_bytes as usize).min(text.len());
                let forwarded = sanitized(&text[..upto], &spans);
                let new = forwarded.get(shown..).unwrap_or("").to_string();
                shown = shown.max(forwarded.len());
                println!(
                    "{}action {:<9} released {:>4} bytes  forward now: {:?}  hits: {}{}",
                    if r.r#final { "final " } else { "chunk " },
                    action(r.action),
                    r.released_bytes,
                    new,
                    hits(&r.hits),
                    if r.reason.is_empty() {
                        String::new()
                    } else {
                        format!("  reason: {}", r.reason)
                    }
                );
                if !r.message.is_empty() {
                    println!("      message: {}", r.message);
                }
            }
        }
        _ => {
            return Err("usage: client classify TEXT | client stream CHUNK [CHUNK ...]".into());
        }
    }
    Ok(())
}

/// `text` with each span (merged where they overlap) replaced by `[FILTERED]`.
fn sanitized(text: &str, spans: &[(usize, usize)]) -> String {
    let mut spans: Vec<(usize, usize)> = spans
        .iter()
        .map(|&(s, e)| (s.min(text.len()), e.min(text.len())))
        .filter(|(s, e)| s < e)
        .collect();
    spans.sort_unstable();
    let mut out = String::new();
    let mut at = 0;
    for (s, e) in spans {
        if e <= at {
            continue;
        }
        if s >= at {
            out.push_str(text.get(at..s).unwrap_or(""));
            out.push_str("[FILTERED]");
        }
        at = e;
    }
    out.push_str(text.get(at..).unwrap_or(""));
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client: {e}");
            ExitCode::FAILURE
        }
    }
}
