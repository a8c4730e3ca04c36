//! mistguard around Mistral chat completions, in Rust: the crate's tonic client
//! (`mistguard::daemon::pb`) and reqwest for Mistral's chat API (its server-sent events parsed by
//! hand).
//!
//! 1. Classify the prompt (`DIRECTION_INPUT`) before it goes to Mistral; refuse to send it when
//!    the action is RESTRICT or worse (RESTRICT, RATE_LIMIT, BLOCK, HARD_BLOCK); send the
//!    sanitized text on SANITIZE.
//! 2. Stream the chat completion (`"stream": true`) through `ClassifyStream`
//!    (`DIRECTION_OUTPUT`), printing only `released_text`, and stop on a block.
//! 3. Ask for tool calls (`tools`) and guard each with `AuthorizeToolCall` before running it: run
//!    it only when the decision is ALLOW.
//!
//! ```sh
//! cargo run --release --example mistral_chat -- "What is the weather in Paris?"
//! ```
//!
//! Configuration (environment): `MISTGUARD_ADDR` (default `127.0.0.1:50051`), `MISTGUARD_TOKEN`
//! (sent as the bearer token when set), `MISTRAL_API_KEY`, `MISTRAL_SERVER_URL` (default
//! `https://api.mistral.ai`), `MISTRAL_MODEL` (default `mistral-small-latest`).

use mistguard::daemon::pb::{
    self, guard_client::GuardClient, AuthorizeToolCallRequest, ClassifyRequest,
    ClassifyStreamRequest,
};
use serde_json::{json, Value};
use std::io::Write;
use std::process::ExitCode;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Request;

type Error = Box<dyn std::error::Error + Send + Sync>;

const SUBJECT: &str = "example-rust";
const DEFAULT_PROMPT: &str = "What is the weather in Paris? And clean up the old staging database.";

struct Mistral {
    http: reqwest::Client,
    url: String,
    key: String,
    model: String,
}

impl Mistral {
    fn from_env() -> Mistral {
        let base =
            std::env::var("MISTRAL_SERVER_URL").unwrap_or_else(|_| "https://api.mistral.ai".into());
        Mistral {
            http: reqwest::Client::new(),
            url: format!("{}/v1/chat/completions", base.trim_end_matches('/')),
            key: std::env::var("MISTRAL_API_KEY").unwrap_or_default(),
            model: std::env::var("MISTRAL_MODEL").unwrap_or_else(|_| "mistral-small-latest".into()),
        }
    }

    async fn post(&self, body: Value) -> Result<reqwest::Response, Error> {
        let res = self
            .http
            .post(&self.url)
            .bearer_auth(&self.key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await?;
        if !res.status().is_success() {
            let status = res.status();
            let text = res.text().await.unwrap_or_default();
            return Err(format!("Mistral answered {status}: {text}").into());
        }
        Ok(res)
    }
}

fn action_name(a: i32) -> String {
    pb::Action::try_from(a)
        .map(|a| a.as_str_name().trim_start_matches("ACTION_").to_string())
        .unwrap_or_else(|_| a.to_string())
}

fn rules_of(hits: &[pb::Hit]) -> String {
    let mut rules: Vec<&str> = hits.iter().map(|h| h.rule_id.as_str()).collect();
    rules.sort_unstable();
    rules.dedup();
    if rules.is_empty() {
        "-".into()
    } else {
        rules.join(",")
    }
}

fn blocks(a: i32) -> bool {
    a >= pb::Action::Block as i32
}

fn with_token<T>(msg: T) -> Result<Request<T>, Error> {
    let mut r = Request::new(msg);
    if let Ok(token) = std::env::var("MISTGUARD_TOKEN") {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(r)
}

/// Step 1: the text to send to Mistral (the prompt, or its sanitized text), or `None`.
async fn classify_prompt(
    guard: &mut GuardClient<Channel>,
    prompt: &str,
) -> Result<Option<String>, Error> {
    let r = guard
        .classify(with_token(ClassifyRequest {
            text: prompt.into(),
            direction: pb::Direction::Input as i32,
            subject: SUBJECT.into(),
            ..Default::default()
        })?)
        .await?
        .into_inner();
    println!(
        "prompt verdict: {} (rules {}, decision {})",
        action_name(r.action),
        rules_of(&r.hits),
        r.decision_id
    );
    if !r.message.is_empty() {
        println!("prompt message: {}", r.message);
    }
    if r.action >= pb::Action::Restrict as i32 {
        println!("refused: the prompt was not sent to Mistral");
        return Ok(None);
    }
    if r.action == pb::Action::Sanitize as i32 {
        if let Some(s) = r.sanitized_text {
            return Ok(Some(s));
        }
    }
    Ok(Some(prompt.into()))
}

/// The text of a chunk's delta content: a string, or a list of chunks (their `text`).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text")?.as_str())
            .collect(),
        _ => String::new(),
    }
}

/// Reads Mistral's server-sent events and sends each piece of text to the stream, until
/// `data: [DONE]`, the end of the body, or the stream's receiver is gone (a block).
async fn pump(
    mut res: reqwest::Response,
    tx: mpsc::Sender<ClassifyStreamRequest>,
) -> Result<(), Error> {
    let mut buf: Vec<u8> = Vec::new();
    let mut first = true;
    while let Some(bytes) = res.chunk().await? {
        buf.extend_from_slice(&bytes);
        // Events end with a blank line.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let event = String::from_utf8_lossy(&event).replace("\r\n", "\n");
            let data: String = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                return Ok(());
            }
            let chunk: Value = serde_json::from_str(&data)?;
            let choices = chunk["choices"].as_array().cloned().unwrap_or_default();
            for choice in choices {
                let text = text_of(&choice["delta"]["content"]);
                if text.is_empty() {
                    continue;
                }
                let mut req = ClassifyStreamRequest {
                    text,
                    ..Default::default()
                };
                if first {
                    first = false;
                    req.direction = pb::Direction::Output as i32;
                    req.subject = SUBJECT.into();
                }
                if tx.send(req).await.is_err() {
                    return Ok(()); // the stream ended (blocked): stop reading Mistral
                }
            }
        }
    }
    Ok(())
}

/// Step 2: the streamed completion, through `ClassifyStream`; prints only `released_text`.
async fn stream_completion(
    guard: &mut GuardClient<Channel>,
    mistral: &Mistral,
    prompt: &str,
) -> Result<(), Error> {
    let res = mistral
        .post(json!({
            "model": mistral.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": true,
        }))
        .await?;
    let (tx, rx) = mpsc::channel(16);
    let reader = tokio::spawn(pump(res, tx));
    let mut responses = guard
        .classify_stream(with_token(ReceiverStream::new(rx))?)
        .await?
        .into_inner();
    println!("completion:");
    let mut end = None;
    while let Some(r) = responses.message().await? {
        if !r.released_text.is_empty() {
            print!("{}", r.released_text);
            std::io::stdout().flush()?;
        }
        if blocks(r.action) || r.r#final {
            end = Some(r);
            break;
        }
    }
    // Stop reading Mistral: dropping the response stream closes the request stream's receiver.
    drop(responses);
    match end.as_ref() {
        Some(r) if blocks(r.action) => reader.abort(),
        _ => {
            if let Ok(Err(e)) = reader.await {
                return Err(e);
            }
        }
    }
    println!();
    match end {
        Some(r) if blocks(r.action) => {
            println!(
                "stream blocked: {} (rules {}, reason {})",
                action_name(r.action),
                rules_of(&r.hits),
                r.reason
            );
            if !r.message.is_empty() {
                println!("stream message: {}", r.message);
            }
        }
        Some(r) => println!(
            "stream end: {} (reason {})",
            action_name(r.action),
            r.reason
        ),
        None => {}
    }
    Ok(())
}

fn tools() -> Value {
    let tool = |name: &str, description: &str, arg: &str| {
        json!({
            "type": "function",
            "function": {
                "name": name,
                "description": description,
                "parameters": {
                    "type": "object",
                    "properties": {arg: {"type": "string"}},
                    "required": [arg],
                },
            },
        })
    };
    json!([
        tool("get_weather", "The current weather in a city", "city"),
        tool("delete_database", "Deletes a database", "name"),
    ])
}

/// "Runs" a tool.
fn run_tool(name: &str, args: &Value) -> Option<String> {
    let arg = |k: &str| args[k].as_str().unwrap_or_default().to_string();
    match name {
        "get_weather" => Some(format!("sunny, 21 C in {}", arg("city"))),
        "delete_database" => Some(format!("database {} deleted", arg("name"))),
        _ => None,
    }
}

/// Step 3: the completion's `tool_calls`, each authorized before it runs.
async fn guard_tool_calls(
    guard: &mut GuardClient<Channel>,
    mistral: &Mistral,
    prompt: &str,
) -> Result<(), Error> {
    let body = mistral
        .post(json!({
            "model": mistral.model,
            "messages": [{"role": "user", "content": prompt}],
            "tools": tools(),
            "tool_choice": "auto",
        }))
        .await?
        .bytes()
        .await?;
    let res: Value = serde_json::from_slice(&body)?;
    let calls = res["choices"][0]["message"]["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    println!("tool calls: {}", calls.len());
    let context = json!({"environment": "production", "user_role": "developer"}).to_string();
    for call in calls {
        let name = call["function"]["name"].as_str().unwrap_or_default();
        // Mistral sends the arguments as a JSON string (an object is accepted too).
        let args_json = match &call["function"]["arguments"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let d = guard
            .authorize_tool_call(with_token(AuthorizeToolCallRequest {
                tool: name.into(),
                arguments_json: args_json.clone(),
                context_json: context.clone(),
                subject: SUBJECT.into(),
                request_id: call["id"].as_str().unwrap_or_default().into(),
                ..Default::default()
            })?)
            .await?
            .into_inner();
        let decision = pb::ToolDecision::try_from(d.decision)
            .map(|t| {
                t.as_str_name()
                    .trim_start_matches("TOOL_DECISION_")
                    .to_string()
            })
            .unwrap_or_else(|_| d.decision.to_string());
        let policy = if d.policy.is_empty() { "-" } else { &d.policy };
        println!("tool {name}: {decision} (policy {policy}: {})", d.reason);
        let args: Value = serde_json::from_str(&args_json).unwrap_or(Value::Null);
        if d.decision == pb::ToolDecision::Allow as i32 {
            match run_tool(name, &args) {
                Some(out) => println!("ran {name}: {out}"),
                None => println!("not run: {name} (unknown tool)"),
            }
        } else if d.decision == pb::ToolDecision::RequireApproval as i32 {
            println!(
                "not run: {name} (approval {} by {})",
                d.approval_id,
                d.approvers.join(", ")
            );
        } else {
            println!("not run: {name}");
        }
    }
    Ok(())
}

async fn run(prompt: String) -> Result<(), Error> {
    let addr = std::env::var("MISTGUARD_ADDR").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let addr = if addr.contains("://") {
        addr
    } else {
        format!("http://{addr}")
    };
    let mut guard = GuardClient::connect(addr).await?;
    let mistral = Mistral::from_env();
    let Some(prompt) = classify_prompt(&mut guard, &prompt).await? else {
        return Ok(());
    };
    stream_completion(&mut guard, &mistral, &prompt).await?;
    guard_tool_calls(&mut guard, &mistral, &prompt).await?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_PROMPT.into());
    match run(prompt).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mistral_chat: {e}");
            ExitCode::FAILURE
        }
    }
}
